"""Grey level run length matrix (GLRLM) features, IBSI 1 family TP0I.

A run is a maximal line of consecutive ROI voxels with the same grey level along a
direction Delta (13 in 3-D, 4 in-plane); voxels outside the ROI end a run. r_ij counts
runs of level i and length j. With N_s = sum r_ij runs, r_i. = sum_j r_ij and
r_.j = sum_i r_ij. Run percentage divides N_s by N_v, the number of ROI voxels behind
the matrix; a merged matrix sums the N_v of its parts (IBSI: N_v times the number of
merged directions). Names are the IBSI tags (``rlm_sre``, ...).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from medrep_jax.eval.radiomics import texture

PREFIX = "rlm"
NAMES = ("sre", "lre", "lgre", "hgre", "srlge", "srhge", "lrlge", "lrhge", "glnu",
         "glnu_norm", "rlnu", "rlnu_norm", "r_perc", "gl_var", "rl_var", "rl_entr")


def run_lengths(g: np.ndarray, m: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(starts, lengths): a mask of the first voxel of every run along ``m`` and its length.

  Loops over run length (at most the longest run), never over voxels.
  """
  roi = g > 0
  same_next = roi & (texture.shift(g, m, 0) == g)  # the run goes on at k + m
  prev = texture.shift(g, tuple(-c for c in m), 0)
  starts = roi & (prev != g)
  lengths = starts.astype(np.int64)
  alive = starts & same_next
  step = 1
  while alive.any():
    lengths += alive
    step += 1
    alive &= texture.shift(same_next, tuple(step * c - c for c in m), False)
  return starts, lengths


def matrices(g: np.ndarray, n_levels: int, three_d: bool) -> dict[str, np.ndarray]:
  """{"runs": (S, D, N_g, L), "n_voxels": (S, D)} with L the longest possible run."""
  offsets = texture.OFFSETS_3D if three_d else texture.OFFSETS_2D
  n_slices = 1 if three_d else g.shape[2]
  max_len = max(g.shape)
  z = np.broadcast_to(np.arange(g.shape[2]), g.shape)
  runs = np.zeros((n_slices, len(offsets), n_levels, max_len))
  per_slice = (g > 0).sum(axis=(0, 1))
  n_vox = np.repeat((per_slice.sum(keepdims=True) if three_d else per_slice)[:, None],
                    len(offsets), axis=1).astype(np.float64)
  for d, m in enumerate(offsets):
    starts, lengths = run_lengths(g, m)
    s = 0 if three_d else z[starts]
    flat = (s * n_levels + g[starts] - 1) * max_len + lengths[starts] - 1
    runs[:, d] = np.bincount(flat, minlength=n_slices * n_levels * max_len).reshape(
        n_slices, n_levels, max_len)
  return {"runs": runs, "n_voxels": n_vox}


def matrix_features(runs: np.ndarray, n_voxels: float) -> dict[str, float]:
  """The 16 IBSI GLRLM features of one (N_g, L) run-length matrix (NaN where undefined)."""
  ns = runs.sum()
  if ns <= 0:
    return dict.fromkeys(NAMES, float("nan"))
  i = np.arange(1, runs.shape[0] + 1, dtype=np.float64)[:, None]
  j = np.arange(1, runs.shape[1] + 1, dtype=np.float64)[None, :]
  ri, rj = runs.sum(1), runs.sum(0)
  p = runs / ns
  mu_i, mu_j = float((i * p).sum()), float((j * p).sum())
  pz = p[p > 0]
  return {
      "sre": float((runs / j ** 2).sum() / ns),
      "lre": float((runs * j ** 2).sum() / ns),
      "lgre": float((runs / i ** 2).sum() / ns),
      "hgre": float((runs * i ** 2).sum() / ns),
      "srlge": float((runs / (i ** 2 * j ** 2)).sum() / ns),
      "srhge": float((runs * i ** 2 / j ** 2).sum() / ns),
      "lrlge": float((runs * j ** 2 / i ** 2).sum() / ns),
      "lrhge": float((runs * i ** 2 * j ** 2).sum() / ns),
      "glnu": float((ri ** 2).sum() / ns),
      "glnu_norm": float((ri ** 2).sum() / ns ** 2),
      "rlnu": float((rj ** 2).sum() / ns),
      "rlnu_norm": float((rj ** 2).sum() / ns ** 2),
      "r_perc": float(ns / n_voxels),
      "gl_var": float(((i - mu_i) ** 2 * p).sum()),
      "rl_var": float(((j - mu_j) ** 2 * p).sum()),
      "rl_entr": float(-(pz * np.log2(pz)).sum()),
  }


def features(levels: np.ndarray, n_levels: int,
             aggregations: Iterable[str] = tuple(texture.AGGREGATIONS)) -> dict[str, float]:
  """{"rlm_<name>_<aggregation>": value} of a grey-level image or volume (0 outside the ROI)."""
  return texture.family_features(matrices, matrix_features, levels, n_levels, aggregations,
                                 texture.AGGREGATIONS, PREFIX, "runs")
