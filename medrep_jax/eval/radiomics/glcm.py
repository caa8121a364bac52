"""Grey level co-occurrence matrix (GLCM) features, IBSI 1 family LFYI.

M_Delta(i, j) counts ROI voxel pairs (k, k + Delta) with grey levels i and j, for
neighbours at Chebyshev distance 1; pairs with a voxel outside the ROI do not count.
The matrix is made symmetric (M + M^T) and normalised to p_ij = M_ij / sum M. Marginals:
p_i. = sum_j p_ij, p_{i-j}(k) = sum_{|i-j|=k} p_ij (k = 0..N_g-1), p_{i+j}(k) =
sum_{i+j=k} p_ij (k = 2..2N_g). Logarithms are base 2. Feature names are the IBSI
submission-table tags (``cm_joint_max``, ...); aggregation as in ``texture``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from medrep_jax.eval.radiomics import texture

PREFIX = "cm"
NAMES = ("joint_max", "joint_avg", "joint_var", "joint_entr", "diff_avg", "diff_var",
         "diff_entr", "sum_avg", "sum_var", "sum_entr", "energy", "contrast",
         "dissimilarity", "inv_diff", "inv_diff_norm", "inv_diff_mom", "inv_diff_mom_norm",
         "inv_var", "corr", "auto_corr", "clust_tend", "clust_shade", "clust_prom",
         "info_corr1", "info_corr2")


def matrices(g: np.ndarray, n_levels: int, three_d: bool) -> dict[str, np.ndarray]:
  """{"counts": (S, D, N_g, N_g)} symmetric co-occurrence counts.

  ``g`` is a (X, Y, Z) grey-level volume (0 outside the ROI). With ``three_d`` the 13
  3-D directions over the whole volume (S = 1); else the 4 in-plane directions per slice.
  """
  offsets = texture.OFFSETS_3D if three_d else texture.OFFSETS_2D
  n_slices = 1 if three_d else g.shape[2]
  z = np.broadcast_to(np.arange(g.shape[2]), g.shape)
  out = np.zeros((n_slices, len(offsets), n_levels, n_levels))
  for d, m in enumerate(offsets):
    nb = texture.shift(g, m, 0)
    pair = (g > 0) & (nb > 0)
    s = 0 if three_d else z[pair]
    flat = (s * n_levels + g[pair] - 1) * n_levels + nb[pair] - 1
    c = np.bincount(flat, minlength=n_slices * n_levels ** 2).reshape(
        n_slices, n_levels, n_levels)
    out[:, d] = c + c.transpose(0, 2, 1)
  return {"counts": out}


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def matrix_features(counts: np.ndarray) -> dict[str, float]:
  """The 25 IBSI GLCM features of one (N_g, N_g) count matrix (NaN where undefined)."""
  total = counts.sum()
  if total <= 0:
    return dict.fromkeys(NAMES, float("nan"))
  p = counts / total
  ng = p.shape[0]
  lv = np.arange(1, ng + 1, dtype=np.float64)
  i, j = lv[:, None], lv[None, :]
  pi, pj = p.sum(1), p.sum(0)
  dk = np.arange(ng, dtype=np.float64)
  p_diff = np.bincount(np.abs(i - j).astype(int).ravel(), p.ravel(), minlength=ng)
  sk = np.arange(2, 2 * ng + 1, dtype=np.float64)
  p_sum = np.bincount((i + j).astype(int).ravel(), p.ravel(), minlength=2 * ng + 1)[2:]
  mu = float((i * p).sum())
  mu_i, mu_j = float((lv * pi).sum()), float((lv * pj).sum())
  sd_i = np.sqrt(((lv - mu_i) ** 2 * pi).sum())
  sd_j = np.sqrt(((lv - mu_j) ** 2 * pj).sum())
  diff_avg = float((dk * p_diff).sum())
  sum_avg = float((sk * p_sum).sum())
  hxy = _entropy(p)
  pipj = pi[:, None] * pj[None, :]
  nz = p > 0
  hxy1 = float(-(p[nz] * np.log2(pipj[nz])).sum())
  hxy2 = _entropy(pipj)
  hx = _entropy(pi)
  clust = i + j - mu_i - mu_j
  with np.errstate(divide="ignore", invalid="ignore"):
    corr = float(((i - mu_i) * (j - mu_j) * p).sum() / (sd_i * sd_j))
    info1 = (hxy - hxy1) / hx if hx > 0 else float("nan")
  return {
      "joint_max": float(p.max()),
      "joint_avg": mu,
      "joint_var": float(((i - mu) ** 2 * p).sum()),
      "joint_entr": hxy,
      "diff_avg": diff_avg,
      "diff_var": float(((dk - diff_avg) ** 2 * p_diff).sum()),
      "diff_entr": _entropy(p_diff),
      "sum_avg": sum_avg,
      "sum_var": float(((sk - sum_avg) ** 2 * p_sum).sum()),
      "sum_entr": _entropy(p_sum),
      "energy": float((p ** 2).sum()),
      "contrast": float(((i - j) ** 2 * p).sum()),
      "dissimilarity": float((np.abs(i - j) * p).sum()),
      "inv_diff": float((p / (1 + np.abs(i - j))).sum()),
      "inv_diff_norm": float((p / (1 + np.abs(i - j) / ng)).sum()),
      "inv_diff_mom": float((p / (1 + (i - j) ** 2)).sum()),
      "inv_diff_mom_norm": float((p / (1 + (i - j) ** 2 / ng ** 2)).sum()),
      "inv_var": float((p_diff[1:] / dk[1:] ** 2).sum()),
      "corr": corr,
      "auto_corr": float((i * j * p).sum()),
      "clust_tend": float((clust ** 2 * p).sum()),
      "clust_shade": float((clust ** 3 * p).sum()),
      "clust_prom": float((clust ** 4 * p).sum()),
      "info_corr1": float(info1),
      "info_corr2": float(np.sqrt(max(0.0, 1 - np.exp(-2 * (hxy2 - hxy))))),
  }


def features(levels: np.ndarray, n_levels: int,
             aggregations: Iterable[str] = tuple(texture.AGGREGATIONS)) -> dict[str, float]:
  """{"cm_<name>_<aggregation>": value} of a grey-level image or volume (0 outside the ROI)."""
  return texture.family_features(matrices, matrix_features, levels, n_levels, aggregations,
                                 texture.AGGREGATIONS, PREFIX, "counts")
