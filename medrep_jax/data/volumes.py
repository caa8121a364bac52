"""`VolumeSource`: one whole 3-D volume per case, resized and scaled for 3-D methods.

Layout (docs/data.md, "Whole volumes"): the cases are the paths under `root` matching
the case pattern `data.images` (default `{class}/*`; `train/ val/ test/` folders at the
top are read as splits, as for folder sources). A case is

  * a volume file: NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NumPy (.npy, .npz:
    (D, H, W) or (D, H, W, C)), or a single (multi-frame) DICOM file; or
  * a folder holding one DICOM series (`*.dcm` at any depth below it), ordered by slice
    position and rescaled to HU (`dicom_series.py`). `data.dicom_series` says what a
    folder holding several series (SeriesInstanceUID) is: "one" (an error naming the
    series), "split" (each series is a case of its own; the folder's headers are read
    when the source is built) or "stack" (every file is one volume, whatever its series).

Records: "image" float32 (D, H, W, C) at `data.volume_size`, resized with an
antialiased trilinear filter (`resize_volume`, the 3-D form of the bilinear resize of 2-D
images) and then scaled to [0, 1] by `data.volume_norm` (`normalize_volume`): "window"
(the HU window `data.window_level`/`window_width`, for CT), "percentile" (per volume and
channel, `data.volume_percentiles`, for MR), "minmax", "none", or "auto" (window when one
is set, else percentile); plus "label" (int32, from the `{class}` part or a label table)
and "index". Labels, split files, groups and k-fold come from the same code as the
folder sources (`catalog.py`, `splits.py`): splits are carved by case (or by
`data.group_by` group, e.g. the patient), stratified by class, seeded.

Build it from a data config with `registry.get_source` (kind "volume_folder");
`transforms.build_transforms` of a config with `data.volume_size` gives the volume
transforms (channels, normalize mode, shape check: `transforms.volume_transforms`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from medrep_jax.data import catalog as catalog_lib
from medrep_jax.data import dicom_series, formats, imageio, pairing
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, window_of

PathLike = str | os.PathLike
FILE_SUFFIXES = formats.VOLUME_SUFFIXES + formats.ARRAY_SUFFIXES + (dicom_series.SUFFIX,)
NORMS = ("auto", "window", "percentile", "minmax", "none")
SERIES_RULES = ("one", "split", "stack")
LAYOUT_HINT = ("Expected layout: <root>/<class>/<case>, a case being a volume file "
               f"({', '.join(FILE_SUFFIXES)}) or a folder holding one DICOM series; other "
               "layouts set data.images to the case pattern (docs/data.md, 'Whole volumes')")


# ---------------------------------------------------------------- resizing


def _filter_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of a triangle (linear) filter, widened when shrinking.

  Half-pixel centres; the filter's support grows with the shrink factor (antialiasing),
  and taps outside the input are dropped and the rest renormalized, as Pillow's BILINEAR
  resize does, so a volume resized only in-plane matches `imageio.resize_image`.
  """
  scale = n_in / n_out
  support = max(scale, 1.0)
  centres = (np.arange(n_out) + 0.5) * scale
  taps = np.arange(n_in) + 0.5
  w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resize_volume(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Trilinear (antialiased when shrinking) resize of (D, H, W) or (D, H, W, C) to `size`.

  Separable: one filter matrix per axis, applied in the order that shrinks the data
  most first. The result is float32 (integer input is converted).
  """
  volume = np.asarray(volume)
  size = tuple(int(s) for s in size)
  if volume.ndim not in (3, 4) or len(size) != 3 or min(size) < 1:
    raise ValueError(f"resize_volume needs a (D, H, W[, C]) volume and a (D, H, W) size, "
                     f"got {volume.shape} and {size}")
  out = volume.astype(np.float32, copy=False)
  for axis in sorted(range(3), key=lambda a: size[a] / volume.shape[a]):
    if out.shape[axis] != size[axis]:
      w = _filter_matrix(out.shape[axis], size[axis])
      out = np.moveaxis(np.tensordot(w, out, axes=([1], [axis])), 0, axis)
  return np.ascontiguousarray(out, np.float32)


# ---------------------------------------------------------------- intensities


def _scale(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  span = hi - lo
  safe = np.where(span > 0, span, 1)
  return np.where(span > 0, np.clip((x - lo) / safe, 0, 1), 0).astype(np.float32)


def normalize_volume(volume: np.ndarray, norm: str = "auto",
                     window: tuple[float, float] | None = None,
                     percentiles: Sequence[float] = (0.5, 99.5), where: str = "") -> np.ndarray:
  """A (D, H, W, C) volume scaled to [0, 1] float32 (`norm`: module docstring).

  "percentile" and "minmax" scale each channel of each volume by its own statistics
  (a constant channel gives zeros); "window" clips to [level - width/2, level + width/2].

  Raises:
    DataError: an unknown mode, "window" without a window, bad percentiles, or NaN/Inf
      values (naming `where`).
  """
  if norm not in NORMS:
    raise DataError(f"data.volume_norm={norm!r}; expected one of {NORMS}")
  x = np.asarray(volume, np.float32)
  if not np.isfinite(x).all():
    raise DataError(f"the volume {where} holds NaN or Inf values; fix or remove the file")
  if norm == "auto":
    norm = "window" if window is not None else "percentile"
  if norm == "none":
    return x
  if norm == "window":
    if window is None:
      raise DataError("data.volume_norm='window' needs an HU window (data.window_level, "
                      "data.window_width), e.g. -600 and 1500 for lung CT")
    return formats.apply_window(x, formats.check_window(window), "unit").astype(np.float32)
  p = (0.0, 100.0) if norm == "minmax" else tuple(float(v) for v in percentiles)
  if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
    raise DataError(f"data.volume_percentiles={tuple(percentiles)}; expected (low, high) "
                    "with 0 <= low < high <= 100")
  flat = x.reshape(-1, x.shape[-1])
  if norm == "minmax":
    lo, hi = flat.min(0), flat.max(0)
  else:
    lo, hi = np.percentile(flat, p, axis=0).astype(np.float32)
  return _scale(x, lo, hi)


# ---------------------------------------------------------------- listing


def _dicom_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.rglob("*")
                if p.is_file() and p.name.lower().endswith(dicom_series.SUFFIX))


def _find_cases(root: pathlib.Path, pattern: str) -> tuple[list[catalog_lib.Item],
                                                            list[tuple[str, str]]]:
  """Case paths matching `pattern` (outermost matches; DICOM folders and volume files)."""
  regex = pairing.compile_pattern(pattern)
  items, skipped = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    here = pathlib.Path(dirpath)
    dirnames.sort()
    keep = []
    for d in dirnames:
      if d.startswith("."):
        continue
      rel = (here / d).relative_to(root).as_posix()
      found = regex.fullmatch(rel)
      if found is None:
        keep.append(d)
      elif _dicom_files(here / d):
        items.append(catalog_lib.Item(rel, parts=found.groupdict()))
      else:
        skipped.append((rel, f"a case folder without {dicom_series.SUFFIX} files (volume "
                        "files inside case folders need a file pattern, e.g. "
                        "data.images='{class}/*/*.nii.gz')"))
    dirnames[:] = keep
    for name in sorted(filenames):
      rel = (here / name).relative_to(root).as_posix()
      found = regex.fullmatch(rel)
      if found is None or name.startswith("."):
        continue
      if name.lower().endswith(FILE_SUFFIXES):
        items.append(catalog_lib.Item(rel, parts=found.groupdict()))
      elif not name.lower().endswith((".raw", ".zraw")):  # MetaImage data beside its .mhd
        skipped.append((rel, "not a volume file (" + ", ".join(FILE_SUFFIXES) + ")"))
  return sorted(items, key=lambda it: it.path), skipped


def _class_dirs(root: pathlib.Path, pattern: str) -> list[str]:
  """The folders that the `{class}` component of the case pattern names."""
  parts = pattern.strip("/").split("/")
  k = next((i for i, p in enumerate(parts) if "{class}" in p), None)
  if k is None or k == len(parts) - 1:
    return []
  regex = pairing.compile_pattern("/".join(parts[:k + 1]))
  return sorted(p.relative_to(root).as_posix() for p in root.glob("/".join(["*"] * (k + 1)))
                if p.is_dir() and regex.fullmatch(p.relative_to(root).as_posix()))


@dataclasses.dataclass(frozen=True)
class VolumeDecode:
  """How a case becomes an "image" (the volume fields of a data config)."""
  volume_size: tuple[int, int, int] = (80, 96, 80)
  norm: str = "auto"
  window: tuple[float, float] | None = None
  percentiles: tuple[float, float] = (0.5, 99.5)
  series: str = "one"
  array_key: str = ""

  def __post_init__(self):
    size = tuple(self.volume_size)
    if len(size) != 3 or min(int(s) for s in size) < 1:
      raise DataError(f"data.volume_size={size}; expected (D, H, W) with every side >= 1")
    if self.series not in SERIES_RULES:
      raise DataError(f"data.dicom_series={self.series!r}; expected one of {SERIES_RULES}")
    if self.norm not in NORMS:
      raise DataError(f"data.volume_norm={self.norm!r}; expected one of {NORMS}")
    if self.norm == "window" and self.window is None:
      raise DataError("data.volume_norm='window' needs an HU window (data.window_level, "
                      "data.window_width)")
    formats.check_window(self.window)


class VolumeSource(Source):
  """Whole volumes, one per case (module docstring).

  Attributes:
    catalog: the cases of this split (`items`; `sub` is the series number of a folder
      split by `dicom_series="split"`), what was skipped and why.
    groups: the group of each case (the case path without `data.group_by`).
    labels: int32 labels of every case, when the data has classes.
  """

  def __init__(self, root: PathLike, split: str = "train", *,
               spec: catalog_lib.Spec = catalog_lib.Spec(images="{class}/*"),
               decode: VolumeDecode = VolumeDecode(), channels: int | None = None,
               num_classes: int | None = None, skip_corrupt: bool = False,
               name: str | None = None):
    if channels not in (None, 0, 1, 3):
      raise DataError(f"data.channels must be 0 (as stored), 1 or 3, got {channels!r}")
    self.root = pathlib.Path(root).expanduser()
    self.decode, self.skip_corrupt = decode, skip_corrupt
    self.catalog = self._catalog(split, spec)
    self.skipped = list(self.catalog.skipped)
    self.num_skipped_at_init = len(self.skipped)
    items, names = self.catalog.items, self.catalog.class_names
    self.groups = [it.group for it in items]
    if names and all(it.label is not None for it in items):
      self.labels = np.asarray([it.label for it in items], np.int32)
    if num_classes and len(names) > num_classes:
      raise DataError(f"{self.root}: found {len(names)} classes {list(names)}, more than "
                      f"data.num_classes={num_classes}")
    self.channels = int(channels or 0) or self._probe_channels()
    self.info = SourceInfo(
        name=name or self.root.name, num_classes=num_classes or len(names),
        class_names=tuple(names), channels=self.channels, image_dtype="float32")

  # ---------------------------------------------------------------- listing
  def _catalog(self, split: str, spec: catalog_lib.Spec) -> catalog_lib.Catalog:
    """Lists the cases, then labels, splits and groups them as `catalog.build_catalog`
    does files (`catalog.finish_catalog`)."""
    root = self.root
    if not root.is_dir():
      raise DataError(f"data root folder {root} does not exist; check the path (data.root)")
    prefix, pattern = catalog_lib.split_prefix(root, spec)
    items, skipped = _find_cases(root, pattern)
    if not spec.labels_csv:
      self._check_classes(root, pattern, spec, items)
    if self.decode.series == "split":
      items = self._split_series(items, skipped)

    def no_items():
      why = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
      return DataError(f"no cases under {root} match data.images={pattern!r}"
                       f"{' (skipped: ' + why + ')' if why else ''}. {LAYOUT_HINT}")

    return catalog_lib.finish_catalog(root, split, spec, items, skipped, prefix,
                                      no_items=no_items, multi_label=False)

  def _check_classes(self, root: pathlib.Path, pattern: str, spec: catalog_lib.Spec,
                     items: list[catalog_lib.Item]) -> None:
    """Every class folder (and every name in data.class_names) holds a case."""
    found = {it.parts.get("class") for it in items}
    for rel in _class_dirs(root, pattern):
      cls = rel.rsplit("/", 1)[-1]
      if cls not in found and (not spec.class_names or cls in spec.class_names):
        raise DataError(f"class folder {root / rel} holds no volumes matching "
                        f"data.images={pattern!r}; add cases or remove the folder. "
                        f"{LAYOUT_HINT}")
    lower = {str(f).lower() for f in found}
    missing = [c for c in spec.class_names if c.lower() not in lower]
    if missing and "class" in pairing.part_names(pattern):
      raise DataError(f"class {missing[0]!r} (data.class_names) has no volumes under {root}")

  def _split_series(self, items: list[catalog_lib.Item],
                    skipped: list[tuple[str, str]]) -> list[catalog_lib.Item]:
    """dicom_series="split": one item per series of each DICOM folder (`sub` = its number)."""
    out = []
    for it in items:
      path = self.root / it.path
      if not path.is_dir():
        out.append(it)
        continue
      try:
        uids = list(dicom_series.group_series(self._headers(path)))
      except DataError as e:
        if not self.skip_corrupt:
          raise
        skipped.append((it.path, str(e)))
        continue
      out += [dataclasses.replace(it, sub=k) for k in range(len(uids))]
    return out

  # ---------------------------------------------------------------- reading
  def _probe_channels(self) -> int:
    """Channels as stored: 1 for DICOM, else those of the first readable case."""
    for it in self.catalog.items[:3]:
      path = self.root / it.path
      if path.is_dir() or path.name.lower().endswith(dicom_series.SUFFIX):
        return 1
      try:
        return int(self._array(path, it.sub).shape[-1])
      except DataError as e:
        logging.warning("%s", e)
    return 1

  @staticmethod
  def _headers(folder: pathlib.Path) -> list[dicom_series.SliceHeader]:
    return [dicom_series.read_header(p) for p in _dicom_files(folder)]

  def _series(self, folder: pathlib.Path, sub: int | None) -> np.ndarray:
    headers = self._headers(folder)
    groups = dicom_series.group_series(headers)
    rule = self.decode.series
    if rule == "stack":
      chosen = headers
    elif rule == "split" and sub is not None:
      chosen = list(groups.values())[sub]
    elif len(groups) > 1:
      desc = "; ".join(f"{uid or '(no UID)'}: {len(hs)} files, e.g. {hs[0].path.name}"
                       for uid, hs in groups.items())
      raise DataError(f"{folder} holds {len(groups)} DICOM series ({desc}); a case is one "
                      "series. Set data.dicom_series='split' (each series a case) or "
                      "'stack' (all files one volume), or move the series apart")
    else:
      chosen = headers
    return dicom_series.read_series(chosen, folder).array

  def _array(self, path: pathlib.Path, sub: int | None) -> np.ndarray:
    """The case's voxels (D, H, W, C), as stored (HU for DICOM)."""
    if path.is_dir():
      arr = self._series(path, sub)
    elif path.name.lower().endswith(dicom_series.SUFFIX):
      arr = dicom_series.read_series([dicom_series.read_header(path)], path).array
    else:
      arr = formats.read_volume(path, key=self.decode.array_key or None).array
    if arr.ndim == 3:
      arr = arr[..., None]
    if arr.ndim != 4:
      raise DataError(f"{path} holds an array of shape {arr.shape}; a volume is (D, H, W) "
                      "or (D, H, W, C)")
    if arr.dtype.kind not in "biuf":
      raise DataError(f"{path} holds values of dtype {arr.dtype}, not numbers")
    return arr

  def _num_elements(self) -> int:
    return len(self.catalog.items)

  def _load(self, index: int) -> Record:
    item = self.catalog.items[index]
    path = self.root / item.path
    d = self.decode
    image = resize_volume(self._array(path, item.sub), d.volume_size)
    image = normalize_volume(image, d.norm, d.window, d.percentiles, where=str(path))
    if self.__dict__.get("channels"):
      image = imageio.convert_channels(image, self.channels)
    record: Record = {"image": image}
    if item.label is not None:
      record["label"] = np.int32(item.label)
    return record


def from_fields(root: pathlib.Path, split: str, f: dict[str, Any],
                name: str | None = None) -> VolumeSource:
  """The source of a resolved data config (`registry.fields_of`) of kind "volume_folder"."""
  spec = catalog_lib.Spec(
      images=str(f["images"]) or "{class}/*", class_names=tuple(f["class_names"]),
      labels_csv=str(f["labels_csv"]), label_id_column=str(f["label_id_column"]),
      label_columns=tuple(f["label_columns"]), split_file=str(f["split_file"]),
      split_id_column=str(f["split_id_column"]), split_column=str(f["split_column"]),
      group_by=str(f["group_by"]), num_folds=int(f["num_folds"]), fold=int(f["fold"]),
      val_fraction=float(f["val_fraction"]), test_fraction=float(f["test_fraction"]),
      seed=int(f["seed"]))
  decode = VolumeDecode(
      volume_size=tuple(int(s) for s in f["volume_size"]), norm=str(f["volume_norm"]),
      window=window_of(f), percentiles=tuple(float(p) for p in f["volume_percentiles"]),
      series=str(f["dicom_series"]), array_key=str(f["array_key"]))
  return VolumeSource(root, split, spec=spec, decode=decode,
                      channels=int(f["channels"]) or None,
                      num_classes=int(f["num_classes"]) or None,
                      skip_corrupt=bool(f["skip_corrupt"]), name=name)
