"""`FolderSource`: the one reader of files under a folder.

Which files make a split comes from `catalog.build_catalog` (patterns, pairing, labels,
splits, groups). This module turns the catalog's files into elements and decodes them:

  * 2-D images (PNG, JPEG, TIFF, GIF, BMP): uint8 (H, W, C), channels as stored unless
    `channels` asks for 1 or 3;
  * DICOM (`.dcm`): float32 HU (H, W, 1), optionally windowed (`dicom.read_dicom`);
    `frames="all"` makes every frame of a multi-frame file an element;
  * arrays (`.npy`, `.npz`) and volumes (NIfTI, MetaImage): a 2-D array is one element;
    a volume (or a stacked array with `stacked=True`, slices along axis 0) gives one
    element per slice along `slice_axis` (every `slice_stride`-th, optionally only
    slices whose mask has foreground), or one element per file with `volume="whole"`
    ("image" (Z, Y, X, C), "mask" (Z, Y, X)). uint8 stays uint8; other dtypes become
    float32: raw values when a window is set (the Normalize transform applies it, as
    for DICOM HU), else scaled to [0, 1] by `formats.to_image(value_range=...)`.

Masks are read from any of these formats (a DICOM mask gives its stored values, with the
file's rescale slope/intercept, and the frame of its image), decode to uint8 class ids
(`masks.MaskValues`), several per image are combined
(`masks.combine`), and a region mask (field of view) becomes "roi" (H, W) 0/1.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
from typing import Any

import numpy as np

from medrep_jax.data import catalog as catalog_lib
from medrep_jax.data import dicom_io, formats, imageio, masks as masks_lib
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo

PathLike = str | os.PathLike
_CACHE_SIZE = 4  # volumes kept decoded per process


@dataclasses.dataclass(frozen=True)
class Decode:
  """How files become arrays (the decoding fields of a data config; docs/data.md)."""
  mask_values: masks_lib.MaskValues = masks_lib.MaskValues()
  mask_combine: str = "union"
  resize_masks: bool = False
  mask_from_label: bool = False
  labels_from_mask: bool = False
  window: tuple[float, float] | None = None
  dicom_output: str = "hu"
  frames: str = "first"
  volume: str = "slices"
  slice_axis: int = 0
  slice_stride: int = 1
  only_foreground: bool = False
  stacked: bool = False
  array_key: str = ""
  value_range: str = "auto"

  def __post_init__(self):
    if self.mask_combine not in masks_lib.COMBINE:
      raise DataError(f"data.mask_combine={self.mask_combine!r}; expected one of "
                      f"{masks_lib.COMBINE}")
    if self.volume not in ("slices", "whole"):
      raise DataError(f"data.volume={self.volume!r}; expected 'slices' or 'whole'")
    if self.frames not in ("first", "all"):
      raise DataError(f"frames must be 'first' or 'all', got {self.frames!r} "
                      "(data.dicom_frames)")
    if self.dicom_output not in ("hu", "unit"):
      raise DataError(f"output must be 'hu' or 'unit', got {self.dicom_output!r} "
                      "(data.dicom_output)")
    if self.dicom_output == "unit" and self.window is None:
      raise DataError("output='unit' needs window=(level, width) in HU, e.g. (-600, 1500) "
                      "(data.window_level, data.window_width)")
    formats.check_window(self.window)


def _kind(path: pathlib.Path) -> str:
  suffix = formats.suffix_of(path)
  if suffix == ".dcm":
    return "dicom"
  if suffix in formats.IMAGE_SUFFIXES:
    return "image"
  if suffix in formats.ARRAY_SUFFIXES:
    return "array"
  return "volume"


class FolderSource(Source):
  """Files under `root` as records (see the module docstring and `catalog.py`).

  Attributes:
    catalog: the files of this split (`items`), what was skipped and why.
    entries: (item index, slice or frame index or None) per element.
    skipped: (path, reason) of every file left out (for the inspector).
    groups: the group of each element (its file path when there is no data.group_by).
  """

  def __init__(self, root: PathLike, split: str = "train", *,
               spec: catalog_lib.Spec = catalog_lib.Spec(), decode: Decode = Decode(),
               channels: int | None = None, num_classes: int | None = None,
               skip_corrupt: bool = False, name: str | None = None):
    if channels not in (None, 0, 1, 3):
      raise DataError(f"data.channels must be 0 (as stored), 1 or 3, got {channels!r}")
    self.root = pathlib.Path(root).expanduser()
    self.decode = decode
    self.skip_corrupt = skip_corrupt
    if skip_corrupt:
      spec = dataclasses.replace(spec, unpaired="skip")
    self.catalog = catalog_lib.build_catalog(
        self.root, split, spec, rows=self._stack_rows if decode.stacked else None)
    items = self.catalog.items
    if decode.labels_from_mask and self.catalog.class_names:
      raise DataError("use either classes or labels_from_mask, not both (data.class_names, "
                      "data.labels_from_mask)")
    if decode.mask_from_label and not self.catalog.class_names:
      raise DataError("mask_from_label needs class folders (a {class} part in data.images, "
                      "or data.class_names)")
    self.entries = self._expand(items)
    self.skipped = list(self.catalog.skipped)
    self.num_skipped_at_init = len(self.skipped)
    self.groups = [items[i].group for i, _ in self.entries]
    names = self.catalog.class_names
    if names and not decode.labels_from_mask and all(it.label is not None for it in items):
      # Every element's label without decoding (class counts, stratified label fractions).
      self.labels = np.asarray([items[i].label for i, _ in self.entries],
                               np.float32 if self.catalog.multi_label else np.int32)
    if num_classes and names and len(names) > num_classes and not self.catalog.multi_label:
      raise DataError(f"{self.root}: found {len(names)} classes {list(names)}, so labels "
                      f"reach {len(names) - 1}, outside [0, num_classes={num_classes}) "
                      "(data.num_classes)")
    if decode.labels_from_mask:
      names = ("no_foreground", "foreground")
    has_mask = bool(items and items[0].masks)
    n_mask = 0
    if has_mask:
      n_mask = len(names) if decode.mask_from_label else decode.mask_values.num_ids
      if not n_mask:
        raise DataError("with mask_threshold=None pass mask_values or num_mask_classes "
                        "(data.mask_threshold, data.mask_values, data.num_mask_classes)")
    self.channels, dtype = self._probe(channels or None)
    self.info = SourceInfo(
        name=name or self.root.name, num_classes=num_classes or len(names),
        class_names=tuple(names), channels=self.channels, has_mask=has_mask,
        num_mask_classes=n_mask, multi_label=self.catalog.multi_label, image_dtype=dtype)

  # ---------------------------------------------------------------- listing
  def _expand(self, items: list[catalog_lib.Item]) -> list[tuple[int, int | None]]:
    d, out = self.decode, []
    for i, it in enumerate(items):
      path = self.root / it.path
      kind = _kind(path)
      if it.sub is not None:
        out.append((i, it.sub))
      elif kind == "dicom" and d.frames == "all":
        out += [(i, f) for f in range(_dicom_frames(path))]
      elif kind in ("array", "volume") and d.volume == "slices":
        shape = self._shape(path)
        if shape is None:
          out.append((i, None))  # unreadable: reported (or skipped) when read
        elif kind == "volume" or d.stacked or not _is_2d(shape):
          axis = 0 if kind == "array" and d.stacked else d.slice_axis
          mask = self._mask_volume(it) if d.only_foreground and it.masks else None
          picks = formats.volume_slices(np.empty(shape, np.bool_), axis=axis,
                                        stride=d.slice_stride, mask=mask,
                                        only_foreground=d.only_foreground and mask is not None)
          out += [(i, s) for s in picks]
        else:
          out.append((i, None))
      else:
        out.append((i, None))
    return out

  def _stack_rows(self, item: catalog_lib.Item) -> list[int] | None:
    """The rows (2-D images along axis 0) of a stacked array file; None if not a stack."""
    path = self.root / item.path
    if _kind(path) != "array":
      return None
    shape = self._shape(path)
    if shape is None or _is_2d(shape):
      return None
    d = self.decode
    mask = self._mask_volume(item) if d.only_foreground and item.masks else None
    return formats.volume_slices(np.empty(shape, np.bool_), axis=0, stride=d.slice_stride,
                                 mask=mask, only_foreground=mask is not None)

  def _shape(self, path: pathlib.Path) -> tuple[int, ...] | None:
    """The array's shape (a header read for .npy); None when unreadable."""
    try:
      return tuple(self._array(path).shape)
    except DataError:
      return None

  def _mask_volume(self, item: catalog_lib.Item) -> np.ndarray:
    vols = []
    for m in item.masks:
      raw = np.asarray(self._array(self.root / m))
      vols.append(self.decode.mask_values(raw[..., 0] if raw.ndim == 4 else raw, m))
    return masks_lib.combine(vols, self.decode.mask_combine, item.path)["mask"]

  def _probe(self, channels: int | None) -> tuple[int, str]:
    """(channels, image dtype) from the first readable element (headers for images)."""
    first_kind = _kind(self.root / self.catalog.items[0].path) if self.catalog.items else "image"
    if first_kind == "dicom":
      return channels or 1, "float32"
    if first_kind == "image":
      paths = [self.root / it.path for it in self.catalog.items]
      return channels or imageio.probe_channels(paths[:20]), "uint8"
    for k in range(min(len(self.entries), 5)):
      try:
        image = self._image(k)
      except DataError as e:
        logging.warning("%s", e)
        continue
      return channels or int(image.shape[-1]), str(image.dtype)
    return channels or 1, "float32"

  # ---------------------------------------------------------------- decoding
  def _num_elements(self) -> int:
    return len(self.entries)

  def _cache(self) -> collections.OrderedDict:
    return self.__dict__.setdefault("_volumes", collections.OrderedDict())

  def __getstate__(self):
    state = self.__dict__.copy()
    state.pop("_volumes", None)  # decoded volumes are reloaded in the worker
    return state

  def _array(self, path: pathlib.Path) -> np.ndarray:
    """A whole array or volume file, cached per process."""
    cache = self._cache()
    key = str(path)
    if key in cache:
      cache.move_to_end(key)
      return cache[key]
    if formats.suffix_of(path) == ".npy":
      try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"cannot read array {path}: {e}. Replace or delete the file, or set "
                        "data.skip_corrupt=True") from e
    else:
      arr = formats.read_array(path, key=self.decode.array_key or None)
    cache[key] = arr
    while len(cache) > _CACHE_SIZE:
      cache.popitem(last=False)
    return arr

  def _plane(self, path: pathlib.Path, sub: int | None) -> np.ndarray:
    """A 2-D plane (or whole volume) of an array/volume file, in its stored dtype."""
    if sub is None:
      arr = self._array(path) if _kind(path) != "image" else formats.read_array(path)
      return np.asarray(arr)
    axis = 0 if _kind(path) == "array" and self.decode.stacked else self.decode.slice_axis
    return formats.take_slice(self._array(path), sub, axis)

  def _image(self, index: int) -> np.ndarray:
    i, sub = self.entries[index]
    path = self.root / self.catalog.items[i].path
    kind, d = _kind(path), self.decode
    if kind == "dicom":
      image = dicom_io.read_dicom(path, sub or 0, d.window, d.dicom_output)
      return imageio.convert_channels(image, self.__dict__.get("channels"))
    if kind == "image":
      return imageio.decode_image(path, self.__dict__.get("channels"))
    arr = self._plane(path, sub)
    if d.volume == "whole" and sub is None and not _is_2d(arr.shape):
      image = arr[..., None] if arr.ndim == 3 else arr
    else:
      image = formats.to_hwc(arr, where=str(path))
    if image.dtype == np.uint8:
      pass
    elif d.window is not None:
      image = image.astype(np.float32)
    else:
      image = formats.to_image(image, value_range=d.value_range, where=str(path))
    channels = self.__dict__.get("channels")
    return imageio.convert_channels(image, channels) if image.ndim == 3 else image

  def _mask(self, rel: str, sub: int | None, values: masks_lib.MaskValues) -> np.ndarray:
    """A mask (or region mask) in any format the image side reads, as uint8 ids."""
    path = self.root / rel
    kind = _kind(path)
    if kind == "image":
      grey = values.threshold is not None or bool(values.values)
      raw = imageio.decode_mask(path, grey=grey)
    elif kind == "dicom":  # stored values (rescaled as the file says), the image's frame
      raw = dicom_io.read_dicom(path, sub or 0)[..., 0]
    else:
      raw = self._plane(path, sub)
      if raw.ndim >= 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]  # (H, W, 1) planes, (Z, Y, X, 1) whole volumes
    return values(raw, str(path))

  def _load(self, index: int) -> Record:
    i, sub = self.entries[index]
    item = self.catalog.items[i]
    image = self._image(index)
    record: Record = {"image": image}
    if item.masks:
      found = [self._mask(m, sub, self.decode.mask_values) for m in item.masks]
      found = [self._fit(m, image, item.masks[k], item.path) for k, m in enumerate(found)]
      record.update(masks_lib.combine(found, self.decode.mask_combine, item.path))
    if item.roi:
      roi = self._mask(item.roi, sub, masks_lib.MaskValues(threshold=127))
      record["roi"] = self._fit(roi, image, item.roi, item.path)
    if item.label is not None:
      label = item.label
      record["label"] = label.copy() if np.ndim(label) else np.int32(label)
      if self.decode.mask_from_label and "mask" in record:
        record["mask"] = record["mask"] * np.uint8(label)
    elif self.decode.labels_from_mask and "mask" in record:
      record["label"] = np.int32(record["mask"].any())
    return record

  def _fit(self, mask: np.ndarray, image: np.ndarray, mask_rel: str, image_rel: str):
    want = image.shape[:-1] if image.ndim >= 3 else image.shape
    if mask.shape != want and self.decode.resize_masks and mask.ndim == 2:
      mask = imageio.resize_mask(mask, want)
    if mask.shape != want:
      raise DataError(f"mask {self.root / mask_rel} has shape {mask.shape} but image "
                      f"{self.root / image_rel} has shape {want} (H, W); fix or remove the "
                      "pair, or set data.resize_masks=True")
    return mask


def _dicom_frames(path: pathlib.Path) -> int:
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    return int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
  except Exception:  # pylint: disable=broad-except
    return 1  # reported (or skipped) when the element is read


def _is_2d(shape: tuple[int, ...]) -> bool:
  """(H, W) or (H, W, C) with C <= 4; anything else is a volume or a stack."""
  return len(shape) == 2 or (len(shape) == 3 and shape[-1] <= 4)


def source_summary(src: Any) -> str:
  """One line: items, elements and skipped files (for logs and errors)."""
  return (f"{len(src.catalog.items)} files, {len(src)} elements, "
          f"{len(src.skipped)} skipped")
