"""Colour normalization: sRGB <-> CIELAB (D65) and (modified) Reinhard statistics matching.

Reinhard et al. (2001) match each channel's mean and standard deviation to a reference's in
a decorrelated colour space (their lαβ). The "modified Reinhard" of histopathology (DSDM,
Sec. IV-B1: every ROI patch is matched to the whole-slide average statistics) does the same
in CIELAB, which is what this module does:

  lab' = (lab - mean(lab)) / std(lab) * std_ref + mean_ref   (per channel)

then back to sRGB, clipped to [0, 1]. Grey images are matched in the lightness L alone: a
grey value v is the sRGB colour (v, v, v), whose a and b are 0, so a grey image and its
RGB copy give the same L. The reference statistics are numbers, or computed from an image
file, or averaged over a folder of images (the mean of the per-image means and of the
per-image stds: the "average statistics" of the slide or data set).
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Sequence

import numpy as np

from medrep_jax.data.imageio import IMAGE_EXTS, decode_image, list_images
from medrep_jax.data.sources import DataError

# Linear sRGB -> CIE XYZ (D65, IEC 61966-2-1). The white point is the image of (1, 1, 1),
# so neutral greys get a = b = 0 exactly.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = _RGB_TO_XYZ.sum(axis=1)
_DELTA = 6.0 / 29.0


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
  """sRGB-encoded values in [0, 1] -> linear light."""
  v = np.asarray(v, np.float64)
  return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
  """Linear light -> sRGB-encoded values, clipped to [0, 1]."""
  x = np.clip(x, 0.0, 1.0)
  return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def _f(t: np.ndarray) -> np.ndarray:
  return np.where(t > _DELTA ** 3, np.cbrt(t), t / (3 * _DELTA ** 2) + 4.0 / 29.0)


def _f_inv(t: np.ndarray) -> np.ndarray:
  return np.where(t > _DELTA, t ** 3, 3 * _DELTA ** 2 * (t - 4.0 / 29.0))


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """(..., 3) sRGB in [0, 1] -> (..., 3) CIELAB (L in [0, 100]), D65 white."""
  xyz = srgb_to_linear(rgb) @ _RGB_TO_XYZ.T / _WHITE
  fx, fy, fz = (_f(xyz[..., i]) for i in range(3))
  return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
  """(..., 3) CIELAB -> (..., 3) sRGB, clipped to [0, 1] (out-of-gamut colours clip)."""
  lab = np.asarray(lab, np.float64)
  fy = (lab[..., 0] + 16) / 116
  xyz = np.stack([_f_inv(fy + lab[..., 1] / 500), _f_inv(fy), _f_inv(fy - lab[..., 2] / 200)],
                 axis=-1) * _WHITE
  return linear_to_srgb(xyz @ _XYZ_TO_RGB.T)


def grey_to_lightness(v: np.ndarray) -> np.ndarray:
  """Grey values in [0, 1] (sRGB-encoded) -> CIELAB L of the colour (v, v, v)."""
  return 116 * _f(srgb_to_linear(v)) - 16


def lightness_to_grey(lightness: np.ndarray) -> np.ndarray:
  """CIELAB L -> grey value in [0, 1] (the inverse of `grey_to_lightness`, clipped)."""
  return linear_to_srgb(_f_inv((np.asarray(lightness, np.float64) + 16) / 116))


def _unit(image: np.ndarray, where: str) -> np.ndarray:
  """uint8 -> [0, 1]; float images must already be in [0, 1]."""
  if image.dtype == np.uint8:
    return image.astype(np.float64) / 255.0
  x = np.asarray(image, np.float64)
  if x.size and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
    raise DataError(f"{where}: colour normalization needs uint8 images or float images in "
                    f"[0, 1], got values in [{x.min():.4g}, {x.max():.4g}] (HU data has no "
                    "colour: set data.color_norm='')")
  return np.clip(x, 0.0, 1.0)


def _to_lab(x: np.ndarray, where: str) -> np.ndarray:
  """(..., C) unit image -> (..., 3) LAB for C = 3, (..., 1) L for C = 1."""
  c = x.shape[-1]
  if c == 3:
    return srgb_to_lab(x)
  if c == 1:
    return grey_to_lightness(x)
  raise DataError(f"{where}: colour normalization needs 1 (grey) or 3 (RGB) channels, "
                  f"got an image of shape {x.shape}")


def lab_stats(image: np.ndarray, where: str = "lab_stats") -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of an image in CIELAB: 3 values each for RGB, 1 (L) for grey.

  `image` is (..., C) uint8 or float in [0, 1]; every pixel of every leading axis counts.
  """
  lab = _to_lab(_unit(np.asarray(image), where), where)
  flat = lab.reshape(-1, lab.shape[-1])
  return flat.mean(axis=0), flat.std(axis=0)


def reinhard(image: np.ndarray, mean: Sequence[float], std: Sequence[float],
             eps: float = 1e-6) -> np.ndarray:
  """Matches the image's CIELAB channel means and stds to `mean` and `std` (Reinhard).

  Args:
    image: (..., C) uint8, or float in [0, 1]; C = 3 (RGB) or 1 (grey).
    mean, std: the reference's statistics, (L, a, b) or (L,). A grey image uses L only;
      an RGB image with L-only statistics keeps its a and b.
    eps: floor of the image's std (a constant channel moves to the reference mean).

  Returns:
    The normalized image, clipped to the valid range, in the input's dtype (uint8 rounded;
    float images come back as float32 in [0, 1]).
  """
  image = np.asarray(image)
  where = "color_norm (data.color_norm='reinhard')"
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  lab = _to_lab(_unit(image, where), where)
  n = 1 if lab.shape[-1] == 1 or mean.size == 1 else 3
  flat = lab.reshape(-1, lab.shape[-1])[:, :n]
  mu, sigma = flat.mean(axis=0), flat.std(axis=0)
  lab[..., :n] = (lab[..., :n] - mu) / np.maximum(sigma, eps) * std[:n] + mean[:n]
  out = lab_to_srgb(lab) if lab.shape[-1] == 3 else lightness_to_grey(lab)
  if image.dtype == np.uint8:
    return np.round(out * 255).astype(np.uint8)
  return out.astype(np.float32)


def reference_stats(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of a reference image file, or averaged over a folder's images.

  A folder that mixes grey and colour images (BUSI stores some grey scans as RGB) gives
  L-only statistics, the L of every image, which is what a grey dataset is matched to.

  Raises:
    DataError: naming `data.color_norm_reference` and the path when it is missing, holds
      no image, or cannot be decoded.
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise DataError(f"data.color_norm_reference: {p} does not exist (give an image file or "
                    "a folder of images; a relative path is relative to data.root)")
  return _cached_stats(str(p.resolve()), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_stats(path: str, mtime_ns: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  del mtime_ns  # in the cache key only: a rewritten file is read again
  p = pathlib.Path(path)
  files = list_images(p) if p.is_dir() else [p]
  if not files:
    raise DataError(f"data.color_norm_reference: the folder {p} holds no image "
                    f"({', '.join(IMAGE_EXTS)})")
  stats = []
  for f in files:
    try:
      image = decode_image(f)
    except DataError as e:
      raise DataError(f"data.color_norm_reference: {e}") from e
    stats.append(lab_stats(image, f"data.color_norm_reference {f}"))
  if len({m.size for m, _ in stats}) > 1:  # grey and colour: L only
    stats = [(m[:1], s[:1]) for m, s in stats]
  mean = np.mean([m for m, _ in stats], axis=0)
  std = np.mean([s for _, s in stats], axis=0)
  return tuple(map(float, mean)), tuple(map(float, std))
