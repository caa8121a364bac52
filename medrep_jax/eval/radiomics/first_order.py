"""First-order features: intensity statistics ("ID") and the intensity histogram ("IH").

IBSI 1 families "intensity-based statistics" (UHIW, on the raw ROI intensities X) and
"intensity histogram" (ZVCW, on the discretised grey levels 1..N_g). Moments are
population moments (1/N_v); P_q is the q-th percentile (linear interpolation, NumPy's
default); logarithms are base 2. Names are the IBSI submission-table tags.
"""
from __future__ import annotations

import numpy as np


def _values(x: np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(x, np.float64).ravel()
  if x.size == 0:
    raise ValueError(f"{what}: the ROI holds no voxel")
  if not np.isfinite(x).all():
    raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} of {x.size} ROI values "
                     "are not finite")
  return x


def _statistics(x: np.ndarray, prefix: str) -> dict[str, float]:
  """The 17 features the two families share, named ``<prefix>_<name>``."""
  mean = x.mean()
  dev = x - mean
  var = (dev ** 2).mean()
  p10, p25, median, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
  mid = x[(x >= p10) & (x <= p90)]  # robust MAD uses the 10th-90th percentile range
  with np.errstate(divide="ignore", invalid="ignore"):
    out = {
        "mean": mean, "var": var,
        "skew": (dev ** 3).mean() / var ** 1.5 if var > 0 else 0.0,  # IBSI: 0 if var = 0
        "kurt": (dev ** 4).mean() / var ** 2 - 3 if var > 0 else 0.0,
        "median": median, "min": x.min(), "p10": p10, "p90": p90, "max": x.max(),
        "iqr": p75 - p25, "range": x.max() - x.min(),
        "mad": np.abs(dev).mean(),
        "rmad": np.abs(mid - mid.mean()).mean(),
        "medad": np.abs(x - median).mean(),
        "cov": np.sqrt(var) / mean if mean != 0 else np.nan,
        "qcod": (p75 - p25) / (p75 + p25) if (p75 + p25) != 0 else np.nan,
    }
  return {f"{prefix}_{k}": float(v) for k, v in out.items()}


def _mode(h: np.ndarray, mean: float) -> float:
  top = np.flatnonzero(h == h.max()) + 1.0
  return float(top[np.argmin(np.abs(top - mean))])  # argmin keeps the first (lower) tie


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
  """The 18 IBSI intensity statistics ("stat_*") of the raw ROI intensities.

  Energy = sum X^2 and root mean square = sqrt(energy / N_v) join the shared moments,
  percentiles and dispersions. Skewness and kurtosis are 0 when the variance is 0 (IBSI);
  the coefficient of variation and the quartile coefficient are NaN where their
  denominator is 0.
  """
  x = _values(values, "intensity statistics")
  out = _statistics(x, "stat")
  energy = float((x ** 2).sum())
  out.update(stat_energy=energy, stat_rms=float(np.sqrt(energy / x.size)))
  return out


def intensity_histogram(levels: np.ndarray, n_levels: int) -> dict[str, float]:
  """The 23 IBSI intensity-histogram features ("ih_*") of grey levels 1..``n_levels``.

  Beyond the shared statistics: mode (the most frequent level; on a tie the one closest
  to the mean, the lower of two equidistant ones, as IBSI specifies),
  entropy -sum p_i log2 p_i, uniformity sum p_i^2 and the histogram gradient
  H'(i) = (H(i+1) - H(i-1)) / 2 (one-sided at i = 1 and N_g) over all levels 1..N_g,
  with its maximum and minimum and the levels where they occur (the lowest on a tie).
  """
  x = _values(levels, "intensity histogram")
  if (x != np.round(x)).any() or x.min() < 1 or x.max() > n_levels:
    raise ValueError(f"intensity histogram: levels must be integers in [1, {n_levels}], "
                     f"got [{x.min():g}, {x.max():g}]")
  out = _statistics(x, "ih")
  h = np.bincount(x.astype(np.int64) - 1, minlength=n_levels).astype(np.float64)
  p = h / h.sum()
  grad = np.gradient(h) if n_levels > 1 else np.zeros(1)
  pz = p[p > 0]
  out.update(
      ih_mode=_mode(h, out["ih_mean"]),
      ih_entropy=float(-(pz * np.log2(pz)).sum()),
      ih_uniformity=float((p ** 2).sum()),
      ih_max_grad=float(grad.max()), ih_max_grad_g=float(np.argmax(grad) + 1),
      ih_min_grad=float(grad.min()), ih_min_grad_g=float(np.argmin(grad) + 1),
  )
  return out
