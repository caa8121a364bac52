"""From CAMs to pretraining heatmaps (CAMContrast Sec. 3.1-3.2, Fig. 2-3, Table 4).

Host-side NumPy, applied once when the crop dataset is generated:

  1. pick the map: the abnormal-class CAM (eq. 1), or for multi-label data the average of
     the positive classes' CAMs (Sec. 4.6), or the single unweighted map (Table 4);
  2. min-max normalize per image, at feature-map resolution (Sec. 3.1);
  3. negative suppression: heatmaps of normal-labelled images become zero (Fig. 2);
  4. background suppression: multiply by the foreground mask (input > 15 on the 0-255
     scale, thresholded before cropping) downsampled to the heatmap grid (Fig. 3).

Each step after 2 has a switch (`HeatmapOptions`), so the ablations of Table 4 are configs.
Every step is rank-generic: 3-D CAMs of volumes (Sec. 4.7), (N, d, h, w, C), go through the
same steps, normalized per volume, with the mask block-averaged over d, h and w.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from medrep_jax.models import cam

# CAMContrast Fig. 3: "The threshold value is set to 15 for both retinal fundus
# photographs and chest X-rays" (on the 0-255 scale).
FOREGROUND_THRESHOLD = 15.0
ABNORMAL = 1


@dataclasses.dataclass(frozen=True)
class HeatmapOptions:
  """Switches of the heatmap post-processing (Table 4 ablations).

  Attributes:
    negative_suppression: zero the heatmaps of normal images (Fig. 2).
    background_suppression: multiply by the downsampled foreground mask (Fig. 3).
    foreground_threshold: the mask is input > threshold on the 0-255 scale.
  """
  negative_suppression: bool = True
  background_suppression: bool = True
  foreground_threshold: float = FOREGROUND_THRESHOLD


def options_from_config(heatmap_cfg) -> HeatmapOptions:
  """The `HeatmapOptions` of a config's `heatmap` block (configs/camcontrast.py)."""
  return HeatmapOptions(negative_suppression=bool(heatmap_cfg.negative_suppression),
                        background_suppression=bool(heatmap_cfg.background_suppression),
                        foreground_threshold=float(heatmap_cfg.foreground_threshold))


def minmax(maps: np.ndarray) -> np.ndarray:
  """Per-image min-max normalization of (N, h, w) maps, or per volume of (N, d, h, w) maps
  (`models.cam.minmax_normalize`)."""
  maps = np.asarray(maps, np.float32)
  if maps.ndim not in (3, 4):
    raise ValueError(f"maps must be (N, h, w) or (N, d, h, w), got shape {maps.shape}")
  return cam.minmax_normalize(maps[..., None])[..., 0]


def is_normal(labels: np.ndarray) -> np.ndarray:
  """(N,) bool: coarse label 0, or (multi-hot labels) no positive class."""
  labels = np.asarray(labels)
  return ~labels.astype(bool).any(-1) if labels.ndim == 2 else labels == 0


def select_maps(maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The map a heatmap is made from, (N, h, w) (or (N, d, h, w)), before normalization.

  Args:
    maps: (N, h, w, C) CAMs, or (N, d, h, w, C) 3-D CAMs: C = 2 (binary: the abnormal
      class c = 1 is taken), C = K with (N, K) multi-hot `labels` (the mean of the
      positive classes' CAMs; all K for an image with none), or C = 1 (unweighted maps,
      taken as is).
    labels: (N,) coarse labels or (N, K) multi-hot labels.
  """
  maps, labels = np.asarray(maps, np.float32), np.asarray(labels)
  if maps.ndim not in (4, 5):
    raise ValueError(f"maps must be (N, h, w, C) or (N, d, h, w, C), got shape {maps.shape}")
  if maps.shape[-1] == 1:
    return maps[..., 0]
  if labels.ndim == 2:
    if labels.shape != (maps.shape[0], maps.shape[-1]):
      raise ValueError(f"multi-hot labels {labels.shape} do not match CAMs {maps.shape}")
    w = labels.astype(np.float32)
    w = np.where(w.sum(-1, keepdims=True) > 0, w, 1.0)
    return np.einsum("n...k,nk->n...", maps, w / w.sum(-1, keepdims=True))
  if maps.shape[-1] != 2:
    raise ValueError(f"binary labels need 2-class CAMs (normal, abnormal), got {maps.shape}")
  return maps[..., ABNORMAL]


def foreground_mask(images: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
  """(N, H, W) float32 mask: any channel of the input above `threshold` (0-255 scale).

  Args:
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1]; (N, D, H, W, C)
      volumes give an (N, D, H, W) mask.
  """
  images = np.asarray(images)
  if images.ndim not in (4, 5):
    raise ValueError(f"images must be (N, H, W, C) or (N, D, H, W, C), got shape "
                     f"{images.shape}")
  scaled = images.astype(np.float32) * (1.0 if images.dtype == np.uint8 else 255.0)
  return (scaled.max(axis=-1) > threshold).astype(np.float32)


def downsample_mask(mask: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
  """Area (block-mean) downsampling of (N, H, W) masks to (N, h, w); H, W multiples of h, w.

  Volumes: (N, D, H, W) masks and a (d, h, w) size, block means over d x h x w blocks.
  """
  big, small = tuple(mask.shape[1:]), tuple(int(s) for s in hw)
  if len(big) != len(small):
    raise ValueError(f"mask of shape {mask.shape} has {len(big)} spatial axes, the heatmap "
                     f"size {small} has {len(small)}")
  if any(b % s for b, s in zip(big, small)):
    raise ValueError(f"image size {big} is not a multiple of the heatmap size "
                     f"{small}; use an image size divisible by the encoder's total stride")
  blocks = [d for s, b in zip(small, big) for d in (s, b // s)]  # (h, H/h, w, W/w, ...)
  axes = tuple(range(2, 2 * len(small) + 1, 2))
  return mask.reshape(mask.shape[0], *blocks).mean(axis=axes).astype(np.float32)


def make_heatmaps(maps: np.ndarray, labels: np.ndarray, images: np.ndarray,
                  options: HeatmapOptions = HeatmapOptions()) -> dict[str, np.ndarray]:
  """Heatmaps before and after suppression, and the foreground mask on the heatmap grid.

  Args:
    maps: (N, h, w, C) CAMs (eq. 1) or unweighted maps, see `select_maps`; (N, d, h, w, C)
      for volumes.
    labels: (N,) coarse labels (0 = normal) or (N, K) multi-hot labels.
    images: (N, H, W, channels) inputs the maps came from (for the foreground mask), or
      (N, D, H, W, channels) volumes.
    options: the suppression switches.

  Returns:
    {"raw": min-max normalized (N, h, w), "heatmap": after the enabled suppressions,
     "foreground": the downsampled mask (N, h, w)}, all float32 in [0, 1]; (N, d, h, w)
     for volumes.
  """
  if len(maps) != len(labels) or len(maps) != len(images):
    raise ValueError(f"maps, labels and images differ in length: {len(maps)}, "
                     f"{len(labels)}, {len(images)}")
  raw = minmax(select_maps(maps, labels))
  fg = downsample_mask(foreground_mask(images, options.foreground_threshold), raw.shape[1:])
  heat = raw.copy()
  if options.negative_suppression:
    heat[is_normal(labels)] = 0.0
  if options.background_suppression:
    heat = heat * fg
  return {"raw": raw, "heatmap": heat.astype(np.float32), "foreground": fg}
