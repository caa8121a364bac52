"""Neighbourhood grey tone difference matrix (NGTDM) features, IBSI 1 family IPET.

The paper's "NID" (neighbourhood intensity difference) class. For every ROI voxel k of
level i, A_k is the mean level of its ROI neighbours at Chebyshev distance 1 (8 in-plane
or 26 in 3-D; neighbours outside the ROI are left out, and a voxel with no ROI neighbour
is not counted). s_i = sum_k |i - A_k| and n_i counts the counted voxels of level i;
N_vc = sum n_i, p_i = n_i / N_vc, and N_gp is the number of levels with p_i > 0. The
sums over (i, j) below run over levels with p_i > 0 and p_j > 0:

- coarseness = 1 / sum_i p_i s_i
- contrast = [sum_ij p_i p_j (i - j)^2 / (N_gp (N_gp - 1))] [sum_i s_i / N_vc]
- busyness = sum_i p_i s_i / sum_ij |i p_i - j p_j|
- complexity = sum_ij |i - j| (p_i s_i + p_j s_j) / (p_i + p_j) / N_vc
- strength = sum_ij (p_i + p_j)(i - j)^2 / sum_i s_i

IBSI's conventions for zero denominators: coarseness is capped at 10^6, contrast and
busyness are 0 when N_gp = 1, strength is 0 when sum_i s_i = 0. Aggregation:
``2D`` (per slice, averaged), ``2_5D`` (slices merged) and ``3D`` (see ``texture``).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from medrep_jax.eval.radiomics import texture

PREFIX = "ngt"
NAMES = ("coarseness", "contrast", "busyness", "complexity", "strength")


def matrices(g: np.ndarray, n_levels: int, three_d: bool) -> dict[str, np.ndarray]:
  """{"s": (S, 1, N_g), "n": (S, 1, N_g)}: per slice (2-D) or for the whole volume (3-D)."""
  roi = g > 0
  total = np.zeros(g.shape)
  count = np.zeros(g.shape)
  for m in texture.neighbourhood(three_d):
    total += texture.shift(g, m, 0)
    count += texture.shift(roi, m, False)
  valid = roi & (count > 0)
  diff = np.abs(g[valid] - total[valid] / count[valid])
  n_slices = 1 if three_d else g.shape[2]
  s = 0 if three_d else np.broadcast_to(np.arange(g.shape[2]), g.shape)[valid]
  flat = s * n_levels + g[valid] - 1
  size = n_slices * n_levels
  return {"s": np.bincount(flat, diff, minlength=size).reshape(n_slices, 1, n_levels),
          "n": np.bincount(flat, minlength=size).reshape(n_slices, 1, n_levels).astype(float)}


def _ratio(a: float, b: float, default: float) -> float:
  return float(a / b) if b > 0 else float(default)


def matrix_features(s: np.ndarray, n: np.ndarray) -> dict[str, float]:
  """The 5 IBSI NGTDM features of one pair of (N_g,) arrays s_i and n_i."""
  nvc = n.sum()
  if nvc <= 0:
    return dict.fromkeys(NAMES, float("nan"))
  keep = n > 0
  lv = np.arange(1, n.size + 1, dtype=np.float64)[keep]
  p, s = n[keep] / nvc, s[keep]
  ngp = p.size
  i, j = lv[:, None], lv[None, :]
  pi, pj = p[:, None], p[None, :]
  ps = p * s
  complexity = (np.abs(i - j) * (ps[:, None] + ps[None, :]) / (pi + pj)).sum() / nvc
  return {
      "coarseness": min(_ratio(1.0, ps.sum(), 1e6), 1e6),
      "contrast": _ratio((pi * pj * (i - j) ** 2).sum(), ngp * (ngp - 1), 0) * s.sum() / nvc,
      "busyness": _ratio(ps.sum(), np.abs(i * pi - j * pj).sum(), np.nan) if ngp > 1 else 0.0,
      "complexity": float(complexity),
      "strength": _ratio(((pi + pj) * (i - j) ** 2).sum(), s.sum(), 0),
  }


def features(levels: np.ndarray, n_levels: int,
             aggregations: Iterable[str] = tuple(texture.NEIGHBOURHOOD_AGGREGATIONS)
             ) -> dict[str, float]:
  """{"ngt_<name>_<aggregation>": value} of a grey-level image or volume (0 outside the ROI)."""
  return texture.family_features(matrices, matrix_features, levels, n_levels, aggregations,
                                 texture.NEIGHBOURHOOD_AGGREGATIONS, PREFIX, "n")
