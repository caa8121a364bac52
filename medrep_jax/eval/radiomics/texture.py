"""Shared pieces of the texture families: neighbour offsets, shifts and IBSI aggregation.

Volumes are indexed [x, y, z] with z the slice axis (a 2-D image is one slice). Grey
levels are ints 1..N_g inside the ROI and 0 outside (``discretise.grey_levels``).

Aggregation (IBSI 1, "Aggregating features", figure "figGLCMCalcApproaches"). The texture
families build one matrix per (slice, in-plane direction) for the 2-D methods and one per
3-D direction (13 of them at Chebyshev distance 1) for the 3-D methods; then

| suffix      | IBSI code | CSV name               | what is merged before features are computed |
|-------------|-----------|------------------------|----------------------------------------------|
| `2D_avg`    | BTW3      | 2D, averaged           | nothing: mean over slices and directions     |
| `2D_comb`   | SUJT      | 2D, slice-merged       | the directions of each slice; mean over slices |
| `2_5D_avg`  | JJUI      | 2.5D, direction-merged | the slices of each direction; mean over directions |
| `2_5D_comb` | ZW7Z      | 2.5D, merged           | everything                                   |
| `3D_avg`    | ITBB      | 3D, averaged           | nothing: mean over the 13 directions        |
| `3D_comb`   | IAZD      | 3D, merged             | everything                                   |

Families without directions (NGTDM) have `2D` (8QNN, mean over slices), `2_5D` (62GR,
slices merged) and `3D` (KOBO). Empty matrices (no pair, no run) are left out of a mean.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping

import numpy as np

# suffix -> (IBSI aggregation code, name in the IBSI reference CSV).
AGGREGATIONS = {
    "2D_avg": ("BTW3", "2D, averaged"), "2D_comb": ("SUJT", "2D, slice-merged"),
    "2_5D_avg": ("JJUI", "2.5D, direction-merged"), "2_5D_comb": ("ZW7Z", "2.5D, merged"),
    "3D_avg": ("ITBB", "3D, averaged"), "3D_comb": ("IAZD", "3D, merged"),
}
NEIGHBOURHOOD_AGGREGATIONS = {"2D": ("8QNN", "2D"), "2_5D": ("62GR", "2.5D"),
                              "3D": ("KOBO", "3D")}
# suffix -> (uses the 3-D statistics, axes (slice, direction) summed before features).
_REDUCE = {"2D_avg": (False, ()), "2D_comb": (False, (1,)), "2_5D_avg": (False, (0,)),
           "2_5D_comb": (False, (0, 1)), "3D_avg": (True, (0,)), "3D_comb": (True, (0, 1)),
           "2D": (False, ()), "2_5D": (False, (0, 1)), "3D": (True, (0, 1))}

# Half of the Chebyshev-1 neighbourhood (the other half is the negation): first non-zero > 0.
OFFSETS_3D = tuple(m for m in itertools.product((-1, 0, 1), repeat=3)
                   if any(m) and next(c for c in m if c) > 0)
OFFSETS_2D = tuple(m for m in OFFSETS_3D if m[2] == 0)  # 0, 45, 90, 135 degrees in-plane


def neighbourhood(three_d: bool) -> tuple[tuple[int, int, int], ...]:
  """All 26 (3-D) or 8 (in-plane) offsets at Chebyshev distance 1."""
  half = OFFSETS_3D if three_d else OFFSETS_2D
  return half + tuple(tuple(-c for c in m) for m in half)


def as_volume(levels: np.ndarray) -> np.ndarray:
  """(X, Y) or (X, Y, Z) int grey levels -> (X, Y, Z), cropped to the ROI's bounding box."""
  g = np.asarray(levels)
  if g.ndim == 2:
    g = g[:, :, None]
  if g.ndim != 3:
    raise ValueError(f"grey levels must be a 2-D image or 3-D volume, got shape {g.shape}")
  if not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
    raise ValueError("grey levels must be non-negative ints (0 outside the ROI); "
                     "make them with radiomics.grey_levels")
  roi = g > 0
  if not roi.any():
    raise ValueError(f"the ROI of the grey-level array of shape {g.shape} is empty")
  box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(roi))
  return g[box].astype(np.int64)


def shift(a: np.ndarray, m: Iterable[int], fill) -> np.ndarray:
  """out[k] = a[k + m] where k + m is inside the array, else ``fill``."""
  m = tuple(m)
  out = np.full(a.shape, fill, a.dtype)
  if any(abs(d) >= n for d, n in zip(m, a.shape)):
    return out
  src = tuple(slice(max(d, 0), n + min(d, 0)) for d, n in zip(m, a.shape))
  dst = tuple(slice(max(-d, 0), n - max(d, 0)) for d, n in zip(m, a.shape))
  out[dst] = a[src]
  return out


def check_aggregations(aggregations: Iterable[str], allowed: Mapping[str, tuple]) -> tuple:
  """The requested aggregation suffixes, checked against ``allowed``."""
  aggs = tuple(aggregations)
  bad = [a for a in aggs if a not in allowed]
  if bad:
    raise ValueError(f"unknown aggregation(s) {bad}; choose from {sorted(allowed)}")
  return aggs


def aggregate(stats: Mapping[str, np.ndarray], features: Callable[..., dict], method: str,
              weight: str) -> dict[str, float]:
  """Features of ``stats`` (arrays with leading (slice, direction) axes) under ``method``.

  ``features`` maps one set of statistics (leading axes removed) to {name: value};
  ``weight`` names the statistic whose sum tells an empty matrix.
  """
  _, axes = _REDUCE[method]
  red = {k: v.sum(axis=axes, keepdims=True) if axes else v for k, v in stats.items()}
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in red.items()}
  n = flat[weight].shape[0]
  keep = [i for i in range(n) if flat[weight][i].sum() > 0] or [0]
  rows = [features(**{k: v[i] for k, v in flat.items()}) for i in keep]
  return {name: float(np.mean([r[name] for r in rows])) for name in rows[0]}


def uses_3d(method: str) -> bool:
  return _REDUCE[method][0]


def family_features(stats_fn: Callable[[np.ndarray, int, bool], dict], features: Callable,
                    levels: np.ndarray, n_levels: int, aggregations: Iterable[str],
                    allowed: Mapping[str, tuple], prefix: str, weight: str) -> dict[str, float]:
  """{f"{prefix}_{name}_{suffix}": value} for every requested aggregation suffix.

  ``stats_fn(volume, n_levels, three_d)`` gives the statistics with leading (slice,
  direction) axes: per slice for ``three_d=False``, one slice-less set for ``True``.
  """
  aggs = check_aggregations(aggregations, allowed)
  g = as_volume(levels)
  if g.max() > n_levels:
    raise ValueError(f"grey level {g.max()} exceeds n_levels={n_levels}")
  cache: dict[bool, dict] = {}
  out = {}
  for agg in aggs:
    three_d = uses_3d(agg)
    if three_d not in cache:
      cache[three_d] = stats_fn(g, n_levels, three_d)
    for name, value in aggregate(cache[three_d], features, agg, weight).items():
      out[f"{prefix}_{name}_{agg}"] = value
  return out
