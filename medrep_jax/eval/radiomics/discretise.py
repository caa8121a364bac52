"""Grey-level discretisation of ROI intensities (IBSI 1, sec. "Intensity discretisation").

Texture matrices and the intensity histogram work on integer grey levels 1..N_g. Two
IBSI methods make them from raw intensities X of the ROI:

- fixed bin number (FBN, IBSI code K15C): X_d = floor(N_g (X - X_min) / (X_max - X_min)) + 1,
  and X_d = N_g where X = X_max; X_min and X_max are the ROI's extremes unless given.
- fixed bin size (FBS, IBSI code Q3RU): X_d = floor((X - X_b) / w_b) + 1, with w_b the bin
  width and X_b the lower bound of the re-segmentation range (the ROI minimum if not given).

Both return int64 levels; voxels outside the mask are 0.
"""
from __future__ import annotations

import numpy as np


def fixed_bin_number(values: np.ndarray, n_bins: int, *, lo: float | None = None,
                     hi: float | None = None) -> np.ndarray:
  """FBN levels 1..n_bins of ``values`` (any shape); ``lo``/``hi`` default to the extremes."""
  x = np.asarray(values, np.float64)
  if int(n_bins) != n_bins or n_bins < 1:
    raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
  if x.size == 0:
    return np.zeros(x.shape, np.int64)
  lo = float(x.min()) if lo is None else float(lo)
  hi = float(x.max()) if hi is None else float(hi)
  if hi < lo:
    raise ValueError(f"fixed bin number: upper bound {hi} is below lower bound {lo}")
  if hi == lo:
    return np.ones(x.shape, np.int64)
  if x.min() < lo or x.max() > hi:
    raise ValueError(f"fixed bin number: intensities span [{x.min()}, {x.max()}], outside "
                     f"the range [{lo}, {hi}]; re-segment the ROI first or widen the range")
  levels = np.floor(n_bins * (x - lo) / (hi - lo)).astype(np.int64) + 1
  return np.minimum(levels, n_bins)  # X = X_max goes to N_g, IBSI's special case


def fixed_bin_size(values: np.ndarray, bin_width: float, *, lo: float | None = None) -> np.ndarray:
  """FBS levels floor((X - lo) / bin_width) + 1; ``lo`` defaults to the minimum of ``values``."""
  x = np.asarray(values, np.float64)
  if not bin_width > 0:
    raise ValueError(f"bin_width must be positive, got {bin_width!r}")
  if x.size == 0:
    return np.zeros(x.shape, np.int64)
  lo = float(x.min()) if lo is None else float(lo)
  if x.min() < lo:
    raise ValueError(f"fixed bin size: intensity {x.min()} is below the lower bound {lo}; "
                     "re-segment the ROI to [lo, ...] first or lower `lo`")
  return np.floor((x - lo) / bin_width).astype(np.int64) + 1


def grey_levels(image: np.ndarray, mask: np.ndarray, *, n_bins: int | None = None,
               bin_width: float | None = None, lo: float | None = None,
               hi: float | None = None) -> tuple[np.ndarray, int]:
  """Grey levels of the ROI (0 outside ``mask``) and N_g, the number of levels.

  Give ``n_bins`` (FBN) or ``bin_width`` (FBS), or neither: then the ROI intensities
  must already be integer grey levels >= 1 (as in the IBSI digital phantom) and N_g is
  their maximum. For FBN N_g = ``n_bins``; for FBS N_g is the highest level in the ROI,
  or the level of ``hi`` when given (a fixed range keeps N_g equal across ROIs).
  """
  image = np.asarray(image)
  roi = np.asarray(mask) != 0
  if image.shape != roi.shape:
    raise ValueError(f"image shape {image.shape} and mask shape {roi.shape} differ")
  if not roi.any():
    raise ValueError(f"the mask of shape {roi.shape} selects no voxel")
  x = image[roi].astype(np.float64)
  if not np.isfinite(x).all():
    raise ValueError(f"the ROI holds {int((~np.isfinite(x)).sum())} non-finite intensities")
  if n_bins is not None and bin_width is not None:
    raise ValueError("give n_bins (fixed bin number) or bin_width (fixed bin size), not both")
  if n_bins is not None:
    levels, n_levels = fixed_bin_number(x, n_bins, lo=lo, hi=hi), int(n_bins)
  elif bin_width is not None:
    lo = float(x.min()) if lo is None else lo
    levels = fixed_bin_size(x, bin_width, lo=lo)
    top = int(fixed_bin_size(np.array([hi]), bin_width, lo=lo)[0]) if hi is not None else 0
    n_levels = max(int(levels.max()), top)
  else:
    if (x != np.round(x)).any() or x.min() < 1:
      raise ValueError("ROI intensities are not integer grey levels >= 1 (min "
                       f"{x.min():g}); pass n_bins (FBN) or bin_width (FBS) to discretise")
    levels, n_levels = x.astype(np.int64), int(x.max())
  out = np.zeros(roi.shape, np.int64)
  out[roi] = levels
  return out, n_levels
