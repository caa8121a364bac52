"""Host-side (numpy) record transforms as grain transforms.

Geometric transforms apply to "image" and, with nearest-neighbour, to the record's
masks: "mask" (H, W), the region (field-of-view) mask "roi" (H, W) and the stacked
masks "masks" (K, H, W) of `data.mask_combine="stack"`. Whole volumes
(`data.volume="whole"`: "image" (D, H, W, C), "mask"/"roi" (D, H, W), "masks"
(K, D, H, W)) are resized and cropped in-plane, slice by slice; the depth D is kept.
Use them with `grain.MapDataset.source(src).map(t)`. `build_transforms(data_cfg)`
gives the standard (deterministic) pipeline whose output batches: "image"
float32 (S, S, C) (or (D, S, S, C)), "mask" uint8 (S, S), "roi" and "masks" when
the source gives them, "label", "index"; with `data.resize_mode="pad"` non-square
images are padded to a square first (aspect ratio kept), and `data.color_norm="reinhard"`
matches colours to a reference (`medrep_jax.data.color`). Random augmentation is not done
here: it runs on device inside the compiled train step (`medrep_jax.data.augment`).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Sequence

import grain
import numpy as np

from medrep_jax.data import color
from medrep_jax.data.imageio import convert_channels, resize_image, resize_mask
from medrep_jax.data.sources import DataError, Record, window_of

# Mask fields that follow the image's geometry: key -> number of axes before the
# image's spatial shape ("masks" has one: K masks of the image).
MASK_KEYS = {"mask": 0, "roi": 0, "masks": 1}


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _spatial(record: Record, where: str) -> tuple[int, ...]:
  """The image's spatial shape: (H, W), or (D, H, W) for a whole volume."""
  shape = np.shape(record["image"])
  if len(shape) not in (3, 4):
    raise DataError(f"{where}: element {record.get('index', '?')} has image shape {shape}; "
                    "expected (H, W, C), or (D, H, W, C) for a whole volume "
                    "(data.volume='whole')")
  return tuple(shape[:-1])


def _check_mask(record: Record, where: str) -> None:
  """Every mask field has the image's spatial shape (after its leading axes)."""
  spatial = _spatial(record, where)
  for key, lead in MASK_KEYS.items():
    if key not in record:
      continue
    shape = np.shape(record[key])
    if len(shape) != lead + len(spatial) or shape[lead:] != spatial:
      what = f"{key} shape {shape}" + (" (K masks first)" if lead else "")
      raise DataError(f"{where}: element {record.get('index', '?')} has image shape "
                      f"{np.shape(record['image'])} but {what}")


def _per_plane(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray],
               plane_ndim: int) -> np.ndarray:
  """`fn` on every trailing `plane_ndim`-D plane of `arr` (slices of a volume, K masks)."""
  lead = arr.shape[:arr.ndim - plane_ndim]
  if not lead:
    return fn(arr)
  flat = arr.reshape((-1,) + arr.shape[len(lead):])
  out = np.stack([fn(p) for p in flat])
  return out.reshape(lead + out.shape[1:])


def _crop(record: Record, top: int, left: int, hw: tuple[int, int], name: str) -> Record:
  _check_mask(record, name)
  h, w = record["image"].shape[-3:-1]
  if h < hw[0] or w < hw[1]:
    raise DataError(f"{name}: element {record.get('index', '?')} of shape {(h, w)} is smaller "
                    f"than the crop {hw}; add a Resize before the crop")
  rows, cols = slice(top, top + hw[0]), slice(left, left + hw[1])
  out = dict(record)
  out["image"] = record["image"][..., rows, cols, :]
  for key in MASK_KEYS:
    if key in record:
      out[key] = record[key][..., rows, cols]
  return out


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
  """Resizes image (bilinear, antialiased) and masks (nearest) to `size` (int or (h, w)).

  Whole volumes are resized in-plane, slice by slice; their depth is kept.
  """
  size: int | tuple[int, int]

  def map(self, element: Record) -> Record:
    _check_mask(element, "Resize")
    hw, out = _hw(self.size), dict(element)
    out["image"] = _per_plane(element["image"], lambda x: resize_image(x, hw), 3)
    for key in MASK_KEYS:
      if key in element:
        out[key] = _per_plane(np.asarray(element[key]), lambda m: resize_mask(m, hw), 2)
    return out


@dataclasses.dataclass(frozen=True)
class PadToSquare(grain.transforms.Map):
  """Pads the shorter side to a square, centred: the image with 0, masks with 0.

  0 is black for uint8 images, background for "mask"/"masks" and outside the region for
  "roi". `value` pads float images instead of 0 (an HU window's low end). Put it before
  `Resize` so non-square images keep their aspect ratio. Volumes are padded in-plane.
  """
  value: float = 0.0

  def map(self, element: Record) -> Record:
    _check_mask(element, "PadToSquare")
    h, w = _spatial(element, "PadToSquare")[-2:]
    d = abs(h - w)
    pads = [(d // 2, d - d // 2), (0, 0)] if h < w else [(0, 0), (d // 2, d - d // 2)]
    out = dict(element)
    image = element["image"]
    out["image"] = np.pad(image, [(0, 0)] * (image.ndim - 3) + pads + [(0, 0)],
                          constant_values=self.value if image.dtype.kind == "f" else 0)
    for key in MASK_KEYS:
      if key in element:
        m = np.asarray(element[key])
        out[key] = np.pad(m, [(0, 0)] * (m.ndim - 2) + pads)
    return out


@dataclasses.dataclass(frozen=True)
class ReinhardNormalize(grain.transforms.Map):
  """Modified Reinhard colour normalization: CIELAB channel means/stds -> `mean`/`std`.

  `mean` and `std` are the reference's (L, a, b) (or (L,): grey images, and colour images
  matched in lightness only); see `medrep_jax.data.color`. The image keeps its dtype
  (uint8, or float in [0, 1]); masks are untouched.
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
      raise DataError(f"ReinhardNormalize needs (L,) or (L, a, b) means and stds, got mean "
                      f"{self.mean} and std {self.std}")

  def map(self, element: Record) -> Record:
    return {**element, "image": color.reinhard(element["image"], self.mean, self.std)}


@dataclasses.dataclass(frozen=True)
class CenterCrop(grain.transforms.Map):
  """Crops the centre `size` (int or (h, w)) of image and masks (in-plane for volumes)."""
  size: int | tuple[int, int]

  def map(self, element: Record) -> Record:
    hw = _hw(self.size)
    h, w = _spatial(element, "CenterCrop")[-2:]
    return _crop(element, max(h - hw[0], 0) // 2, max(w - hw[1], 0) // 2, hw, "CenterCrop")


@dataclasses.dataclass(frozen=True)
class ToChannels(grain.transforms.Map):
  """Converts the image to `channels` (grey -> RGB repeats; RGB -> grey is luma)."""
  channels: int

  def map(self, element: Record) -> Record:
    return {**element, "image": convert_channels(element["image"], self.channels)}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Outputs a float32 image.

  mode "unit": uint8 -> x / 255; float32 passes through, or with
  `value_range=(lo, hi)` (e.g. a HU window) is clipped and rescaled to [0, 1].
  mode "standardize": the unit image minus `mean`, divided by `std` (scalars
  or per channel); with mean/std None, per-image standardization.
  mode "none": only casts to float32.
  """
  mode: str = "unit"
  mean: float | tuple[float, ...] | None = None
  std: float | tuple[float, ...] | None = None
  value_range: tuple[float, float] | None = None

  def __post_init__(self):
    if self.mode not in ("unit", "standardize", "none"):
      raise DataError(f"Normalize mode must be 'unit', 'standardize' or 'none', got {self.mode!r}")

  def map(self, element: Record) -> Record:
    image = element["image"]
    if self.mode == "none":
      return {**element, "image": image.astype(np.float32)}
    if image.dtype == np.uint8:
      x = image.astype(np.float32) * np.float32(1 / 255)
    elif self.value_range is not None:
      lo, hi = self.value_range
      x = (np.clip(image.astype(np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    else:
      x = image.astype(np.float32)
    if self.mode == "standardize":
      if self.mean is None or self.std is None:
        x = (x - x.mean()) / np.float32(x.std() + 1e-6)
      else:
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return {**element, "image": x.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Cast(grain.transforms.Map):
  """Casts record fields, e.g. Cast((("image", "float32"), ("mask", "int32")))."""
  dtypes: tuple[tuple[str, str], ...] = (("image", "float32"),)

  def map(self, element: Record) -> Record:
    out = dict(element)
    for key, dtype in self.dtypes:
      if key in out:
        out[key] = np.asarray(out[key]).astype(dtype)
    return out


@dataclasses.dataclass(frozen=True)
class CheckShapes(grain.transforms.Map):
  """Defensive final check: fixed image shape and masks matching the image.

  The in-plane size and channels are fixed; a whole volume keeps its depth.
  """
  size: int | tuple[int, int]
  channels: int | None = None

  def map(self, element: Record) -> Record:
    _check_mask(element, "CheckShapes")
    shape = element["image"].shape
    want = shape[:-3] + _hw(self.size) + ((self.channels,) if self.channels else shape[-1:])
    if shape != want:
      raise DataError(f"element {element.get('index', '?')}: image shape {shape} after "
                      f"transforms, expected {want}")
    return element


@dataclasses.dataclass(frozen=True)
class CheckVolume(grain.transforms.Map):
  """Final check of whole volumes: "image" is (D, H, W, C) at `size` (and `channels`)."""
  size: tuple[int, int, int]
  channels: int | None = None

  def map(self, element: Record) -> Record:
    shape = np.shape(element["image"])
    want = tuple(self.size) + ((self.channels,) if self.channels else shape[-1:])
    if shape != want:
      raise DataError(f"element {element.get('index', '?')}: volume shape {shape} after the "
                      f"transforms, expected {want} (data.volume_size, data.channels)")
    return element


def volume_transforms(data_cfg: Any) -> list[Any]:
  """Host pipeline of sources that give whole volumes already at `data.volume_size` in
  [0, 1] (kinds volume_folder, phantoms3d: `data/volumes.py`): ToChannels(channels) when
  set, Normalize(`normalize`; no value range: the source applied the window) and
  CheckVolume."""
  size = tuple(int(s) for s in data_cfg.volume_size)
  channels = int(data_cfg.get("channels", 0) or 0) or None
  out = [ToChannels(channels)] if channels else []
  out.append(Normalize(mode=str(data_cfg.get("normalize", "unit"))))
  return out + [CheckVolume(size, channels)]


def color_norm_transform(data_cfg: Any) -> list[Any]:
  """[ReinhardNormalize] from `data.color_norm` and its reference, or [] when it is off.

  The reference is `data.color_norm_stats` (mean L, a, b then std L, a, b; or mean L, std
  L) or `data.color_norm_reference` (an image file, or a folder whose images' statistics
  are averaged; a relative path is relative to the data root).
  """
  mode = str(data_cfg.get("color_norm", ""))
  reference = str(data_cfg.get("color_norm_reference", ""))
  stats = tuple(float(v) for v in data_cfg.get("color_norm_stats", ()))
  if mode not in ("", "reinhard"):
    raise DataError(f"data.color_norm must be '' (off) or 'reinhard', got {mode!r}")
  if not mode:
    if reference or stats:
      raise DataError("data.color_norm_reference / data.color_norm_stats are set but "
                      "data.color_norm is ''; set data.color_norm='reinhard'")
    return []
  if bool(reference) == bool(stats):
    raise DataError("data.color_norm='reinhard' needs exactly one of data.color_norm_reference "
                    "(an image file or a folder of images) and data.color_norm_stats (mean L, "
                    "a, b then std L, a, b; or mean L, std L)")
  if stats:
    if len(stats) not in (2, 6):
      raise DataError(f"data.color_norm_stats needs 6 numbers (mean L, a, b then std L, a, b) "
                      f"or 2 (mean L, std L), got {stats}")
    return [ReinhardNormalize(stats[:len(stats) // 2], stats[len(stats) // 2:])]
  return [ReinhardNormalize(*color.reference_stats(_reference_path(data_cfg, reference)))]


def _reference_path(data_cfg: Any, reference: str) -> pathlib.Path:
  path = pathlib.Path(os.path.expanduser(reference))
  if path.is_absolute():
    return path
  from medrep_jax.data import registry  # pylint: disable=g-import-not-at-top
  try:
    return registry.root_of(data_cfg) / path
  except (DataError, AttributeError) as e:
    raise DataError(f"data.color_norm_reference {reference!r} is relative to the data root, "
                    f"which is unknown ({e}); give an absolute path") from e


def resize_transforms(data_cfg: Any, value: float = 0.0) -> list[Any]:
  """Resize to `data.image_size`; with `data.resize_mode="pad"`, PadToSquare(value) first."""
  mode = str(data_cfg.get("resize_mode", "stretch"))
  if mode not in ("stretch", "pad"):
    raise DataError(f"data.resize_mode must be 'stretch' or 'pad', got {mode!r}")
  size = int(data_cfg.image_size)
  return ([PadToSquare(value)] if mode == "pad" else []) + [Resize(size)]


def build_transforms(data_cfg: Any) -> list[Any]:
  """Standard host pipeline from a data ConfigDict: the same for train and eval.

  ReinhardNormalize when `color_norm="reinhard"` (on the image as stored, before any
  padding), PadToSquare when `resize_mode="pad"` (the HU window's low end pads float
  images with a window, else 0), Resize(image_size), ToChannels(channels) when `channels`
  is set, Normalize(`normalize`) and CheckShapes. Masks ("mask", "roi", "masks") follow the
  image; whole volumes (`data.volume="whole"`) are resized in-plane and keep their depth
  (volumes of different depths batch only with a batch size of 1). The optional HU window
  `window_level`/`window_width` is Normalize's value_range for float images.
  The pipeline is deterministic; augmentation runs on device
  (`medrep_jax.data.augment`). A config with `data.volume_size` (whole volumes resized
  by their source) gets `volume_transforms` instead.
  """
  if tuple(data_cfg.get("volume_size", ()) or ()):
    return volume_transforms(data_cfg)
  size = int(data_cfg.image_size)
  channels = data_cfg.get("channels", None)
  window = window_of(data_cfg)
  value_range = None if window is None else (window[0] - window[1] / 2,
                                             window[0] + window[1] / 2)
  out = color_norm_transform(data_cfg)
  out += resize_transforms(data_cfg, value_range[0] if value_range else 0.0)
  if channels:
    out.append(ToChannels(int(channels)))
  out.append(Normalize(mode=str(data_cfg.get("normalize", "unit")), value_range=value_range))
  out.append(CheckShapes(size, int(channels) if channels else None))
  return out


def apply_transforms(record: Record, transforms: Sequence[Any],
                     rng: np.random.Generator | None = None) -> Record:
  """Applies transforms to one record outside grain (tests, notebooks)."""
  rng = rng if rng is not None else np.random.default_rng(0)
  for t in transforms:
    if isinstance(t, grain.transforms.RandomMap):
      record = t.random_map(record, rng)
    else:
      record = t.map(record)
  return record
