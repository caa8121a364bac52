"""Gradient-orientation histogram (GOH) features: the LTDiff++ paper's "GOH" class.

Not an IBSI family (IBSI 1 defines none), so this module states its own definition:

1. In-plane gradient of the raw intensities, per slice: (g_x, g_y) by central differences
   (``np.gradient``, one-sided at the array border, scaled by the pixel ``spacing``).
   Neighbours outside the ROI take part in the differences; only ROI voxels are counted.
2. Orientation theta = atan2(g_y, g_x) in (-pi, pi] (signed, so a rising and a falling
   edge differ) and magnitude |g|. Voxels with |g| = 0 have no orientation and are left out.
3. ``n_bins`` bins centred on k * 2 pi / n_bins (k = 0..n_bins-1; bin 0 points along +x),
   so axis-aligned and diagonal gradients fall in a bin's middle. Each voxel adds |g|
   (``weighted=True``, the default) or 1 to its bin; p_k is the bin's share of the total.

Features (``goh_*``): ``bin_00``.. the fractions p_k; ``entropy`` -sum p_k log2 p_k;
``uniformity`` sum p_k^2; ``max_fraction`` max_k p_k; ``mean_magnitude`` the mean |g|
over all ROI voxels. Entropy, uniformity, max_fraction and mean_magnitude do not change
when the image is flipped or rotated by 90 degrees (the bins are permuted; with an even
``n_bins``). A ROI without any gradient has NaN fractions, entropy, uniformity and
max_fraction. A 2-D image is one slice of a volume indexed [x, y, z].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PREFIX = "goh"


def orientation_histogram(image: np.ndarray, mask: np.ndarray, *, n_bins: int = 8,
                          spacing: Sequence[float] | None = None,
                          weighted: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(hist (n_bins,), magnitudes of the ROI voxels): the unnormalised histogram."""
  img = np.asarray(image, np.float64)
  roi = np.asarray(mask) != 0
  if img.shape != roi.shape or img.ndim not in (2, 3):
    raise ValueError(f"image {img.shape} and mask {roi.shape} must be one 2-D or 3-D shape")
  if int(n_bins) != n_bins or n_bins < 2:
    raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
  if not roi.any():
    raise ValueError(f"the mask of shape {roi.shape} selects no voxel")
  if spacing is not None and len(spacing) != img.ndim:
    raise ValueError(f"spacing {tuple(spacing)} needs one entry per axis of the image "
                     f"shape {img.shape}")
  sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
  if img.ndim == 2:
    img, roi = img[:, :, None], roi[:, :, None]
  gx = np.gradient(img, sx, axis=0) if img.shape[0] > 1 else np.zeros_like(img)
  gy = np.gradient(img, sy, axis=1) if img.shape[1] > 1 else np.zeros_like(img)
  gx, gy = gx[roi], gy[roi]
  mag = np.hypot(gx, gy)
  has = mag > 0
  width = 2 * np.pi / n_bins
  bins = np.mod(np.round(np.arctan2(gy[has], gx[has]) / width).astype(np.int64), n_bins)
  hist = np.bincount(bins, mag[has] if weighted else None, minlength=n_bins)
  return hist.astype(np.float64), mag


def features(image: np.ndarray, mask: np.ndarray, *, n_bins: int = 8,
             spacing: Sequence[float] | None = None, weighted: bool = True) -> dict[str, float]:
  """{"goh_<name>": value}; see the module docstring for the definition."""
  hist, mag = orientation_histogram(image, mask, n_bins=n_bins, spacing=spacing,
                                    weighted=weighted)
  total = hist.sum()
  out = {}
  if total > 0:
    p = hist / total
    pz = p[p > 0]
    out.update({f"{PREFIX}_bin_{k:02d}": float(v) for k, v in enumerate(p)})
    out.update(goh_entropy=float(-(pz * np.log2(pz)).sum()),
               goh_uniformity=float((p ** 2).sum()), goh_max_fraction=float(p.max()))
  else:
    out.update({f"{PREFIX}_bin_{k:02d}": float("nan") for k in range(n_bins)})
    out.update(dict.fromkeys(("goh_entropy", "goh_uniformity", "goh_max_fraction"),
                             float("nan")))
  out["goh_mean_magnitude"] = float(mag.mean())
  return out
