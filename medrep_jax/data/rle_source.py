"""`RLEMaskCSV`: images in a folder, masks run-length encoded in a CSV (SIIM-ACR layout).

The CSV (default `train-rle.csv` in the data root) has an image-id column (`ImageId`) and
an RLE column (`EncodedPixels`; header cells are stripped, so SIIM's " EncodedPixels"
matches). Each row is one region; an image's rows are OR-ed; "-1" (or "") is an empty
mask. RLE conventions: `rle.py` (SIIM: relative starts, column-major pixels).

Images are the files matching `images` (default `**/*`: every PNG/JPEG/TIFF/GIF/BMP and
DICOM file, at any depth, e.g. SIIM's `<study>/<series>/<ImageId>.dcm`); a CSV id names
an image by its path relative to the root, that path without suffix, its file name or its
stem (`tables.IdIndex`). PNG/JPEG decode to uint8 (H, W, C), DICOM to float32 (H, W, 1)
stored values (`dicom_io.read_dicom`; SIIM's radiographs are 8-bit, so a window
level 127.5, width 255 gives [0, 1]). The mask takes the image's (H, W).

Splits are made as for folder sources (`catalog.py`): split folders or a split file when
the data names splits, else val/test carved from train with `val_fraction`,
`test_fraction` and `seed`, stratified by the label (1 when the image's rows mark any
pixel) and keeping `group_by` groups whole.

Records: "image", "mask" (H, W) uint8 0/1, "label" np.int32 (1 if any mask pixel),
"index". An image with no CSV row, or a CSV id with no image, raises a DataError
naming it, unless `unpaired="skip"` (or `skip_corrupt`): then it is left out and listed
in `skipped`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import numpy as np

from medrep_jax.data import catalog as catalog_lib
from medrep_jax.data import dicom_io, formats, imageio, pairing, rle, tables
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, window_of
from medrep_jax.data.tables import IdIndex, normalize_id

PathLike = str | os.PathLike
SUFFIXES = tuple(formats.IMAGE_SUFFIXES) + (".dcm",)
CLASS_NAMES = ("no_foreground", "foreground")


def _find_column(path: pathlib.Path, header: list[str], name: str, field: str) -> int:
  """Index of column `name` (exact after stripping, else case-insensitive)."""
  if name in header:
    return header.index(name)
  lower = [h.lower() for h in header]
  if name.lower() in lower:
    return lower.index(name.lower())
  raise DataError(f"{path} has no column {name!r} ({field}); columns present: {header}")


def read_rle_csv(path: pathlib.Path, id_column: str = "ImageId",
                 rle_column: str = "EncodedPixels") -> dict[str, list[tuple[int, str]]]:
  """id -> [(line number, RLE text), ...] in file order (an id may have several rows).

  Raises:
    DataError: naming the file when it is missing, has no such column, or a row is
      short or has no id (with its line number).
  """
  if not path.is_file():
    raise DataError(f"the RLE table {path} does not exist (data.rle_csv, relative to the "
                    "data root or absolute)")
  header, rows = tables.read_csv(path, with_lines=True)
  id_name = header[_find_column(path, header, id_column, "data.rle_id_column")]
  rle_name = header[_find_column(path, header, rle_column, "data.rle_column")]
  out: dict[str, list[tuple[int, str]]] = {}
  for line, row in rows:
    key = normalize_id(row[id_name])
    if not key:
      raise DataError(f"{path} line {line} has an empty {id_column!r}")
    out.setdefault(key, []).append((line, row[rle_name]))
  return out


class RLEMaskCSV(Source):
  """Images under `root` with masks from an RLE CSV (see the module docstring).

  Attributes:
    items: the catalog items of this split (`path` relative to the root).
    rows: per element, the (CSV line, RLE text) rows of its image.
    labels: np.int32 per element, 1 when its rows mark any pixel (without decoding).
    skipped: (path, reason) of images and CSV ids left out.
    groups: the group of each element (its path when there is no `group_by`).
  """

  def __init__(self, root: PathLike, split: str = "train", *, csv_path: str = "train-rle.csv",
               id_column: str = "ImageId", rle_column: str = "EncodedPixels",
               relative: bool = True, order: str = "F", images: str = "**/*",
               channels: int | None = None, window: tuple[float, float] | None = None,
               dicom_output: str = "hu", class_names: Sequence[str] = CLASS_NAMES,
               group_by: str = "", split_file: str = "", split_id_column: str = "",
               split_column: str = "", num_folds: int = 0, fold: int = 0,
               val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
               unpaired: str = "error", skip_corrupt: bool = False, name: str | None = None):
    if order not in rle.ORDERS:
      raise DataError(f"data.rle_order={order!r}; expected 'F' (column-major) or 'C'")
    if channels not in (None, 0, 1, 3):
      raise DataError(f"data.channels must be 0 (as stored), 1 or 3, got {channels!r}")
    if dicom_output not in ("hu", "unit") or (dicom_output == "unit" and window is None):
      raise DataError(f"data.dicom_output={dicom_output!r}: expected 'hu', or 'unit' with a "
                      "window (data.window_level, data.window_width)")
    if len(class_names) != 2:
      raise DataError(f"RLE masks give two classes (no mask, mask); data.class_names="
                      f"{list(class_names)}")
    if unpaired not in ("error", "skip"):
      raise DataError(f"data.unpaired={unpaired!r}; expected 'error' or 'skip'")
    self.root = pathlib.Path(root).expanduser()
    self.relative, self.order = bool(relative), order
    self.window, self.dicom_output = window, dicom_output
    self.id_column = id_column
    self.skip_corrupt = skip_corrupt
    skip = skip_corrupt or unpaired == "skip"
    csv_file = pathlib.Path(csv_path).expanduser()
    self.csv_path = csv_file if csv_file.is_absolute() else self.root / csv_file
    table = read_rle_csv(self.csv_path, id_column, rle_column)
    spec = catalog_lib.Spec(
        images=images or "**/*", suffixes=SUFFIXES, group_by=group_by,
        group_unmatched="error", split_file=split_file, split_id_column=split_id_column,
        split_column=split_column, num_folds=num_folds, fold=fold,
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        hint=(f"Expected layout: images matching data.images={images or '**/*'!r} under "
              f"{self.root} (PNG/JPEG/... or DICOM, named by their {id_column}), and the "
              f"RLE table {self.csv_path}"))
    every = catalog_lib.build_catalog(self.root, "all", spec)
    self.skipped = list(every.skipped)
    index = IdIndex(table)
    items, rows, found = [], [], set()
    for it in every.items:
      key = index.find(it.path)
      if key is None:
        self.skipped.append((it.path, f"no row in the RLE table {self.csv_path.name} "
                             f"(data.rle_csv, id column {id_column!r})"))
        continue
      found.add(key)
      it.label = np.int32(any(not rle.is_empty(t) for _, t in table[key]))
      items.append(it)
      rows.append(table[key])
    lonely = [p for p, _ in self.skipped[len(every.skipped):]]
    if lonely and not skip:
      more = (f" ({len(lonely)} images in all: {pairing.describe(lonely)})"
              if len(lonely) > 1 else "")
      raise DataError(f"image {self.root / lonely[0]} has no row in {self.csv_path} (column "
                      f"{id_column!r}){more}. Narrow data.images to the annotated images, or "
                      "set data.unpaired='skip' (or data.skip_corrupt=True) to skip them")
    missing = [(table[k][0][0], k) for k in table if k not in found]
    if missing and not skip:
      line, key = missing[0]
      more = (f" ({len(missing)} ids in all: {pairing.describe([k for _, k in missing])})"
              if len(missing) > 1 else "")
      raise DataError(f"{self.csv_path} line {line}: no image for {id_column} {key!r} under "
                      f"{self.root} matching data.images={spec.images!r}{more}. Add the "
                      "image, fix data.images, or set data.unpaired='skip' (or "
                      "data.skip_corrupt=True) to leave such rows out")
    self.skipped += [(f"{self.csv_path.name} line {line}", f"no image for {id_column} {key!r}")
                     for line, key in missing]
    self.num_skipped_at_init = len(self.skipped)
    if not items:
      raise DataError(f"no image under {self.root} matching data.images={spec.images!r} has a "
                      f"row in {self.csv_path}; check data.images and the id column "
                      f"{id_column!r} ({len(every.items)} images found, {len(table)} ids)")
    chosen = catalog_lib.select(self.root, split, spec, items)
    if not chosen:
      raise DataError(f"split {split!r} of {self.root} is empty ({len(items)} annotated images "
                      f"in all; data.val_fraction={val_fraction}, data.test_fraction="
                      f"{test_fraction})")
    self.items = [items[i] for i in chosen]
    self.rows = [rows[i] for i in chosen]
    self.labels = np.asarray([it.label for it in self.items], np.int32)
    self.groups = [it.group for it in self.items]
    self.channels, dtype = self._probe(channels or None)
    self.info = SourceInfo(
        name=name or self.root.name, num_classes=2, class_names=tuple(class_names),
        channels=self.channels, has_mask=True, num_mask_classes=2, image_dtype=dtype)

  def _probe(self, channels: int | None) -> tuple[int, str]:
    paths = [self.root / it.path for it in self.items]
    if formats.suffix_of(paths[0]) == ".dcm":
      return channels or 1, "float32"
    pictures = [p for p in paths[:20] if formats.suffix_of(p) != ".dcm"]
    return channels or imageio.probe_channels(pictures), "uint8"

  def _num_elements(self) -> int:
    return len(self.items)

  def _image(self, path: pathlib.Path) -> np.ndarray:
    if formats.suffix_of(path) == ".dcm":
      image = dicom_io.read_dicom(path, 0, self.window, self.dicom_output)
      return imageio.convert_channels(image, self.channels)
    return imageio.decode_image(path, self.channels)

  def _load(self, index: int) -> Record:
    path = self.root / self.items[index].path
    image = self._image(path)
    hw = image.shape[:2]
    mask = np.zeros(hw, np.uint8)
    for line, text in self.rows[index]:
      try:
        mask |= rle.decode_rle(text, hw, relative=self.relative, order=self.order)
      except DataError as e:
        raise DataError(f"{self.csv_path} line {line} (image {path}): {e}. Fix or remove "
                        "the row, or set data.skip_corrupt=True to skip the image") from e
    return {"image": image, "mask": mask, "label": np.int32(mask.any())}


def from_fields(root: pathlib.Path, split: str, f: dict[str, Any],
                name: str | None = None) -> RLEMaskCSV:
  """The source of a resolved data config (`registry.fields_of`) of kind "rle_csv"."""
  return RLEMaskCSV(
      root, split, csv_path=str(f["rle_csv"]), id_column=str(f["rle_id_column"]),
      rle_column=str(f["rle_column"]), relative=bool(f["rle_relative"]),
      order=str(f["rle_order"]), images=str(f["images"]) or "**/*",
      channels=int(f["channels"]) or None, window=window_of(f),
      dicom_output=str(f["dicom_output"]),
      class_names=tuple(f["class_names"]) or CLASS_NAMES, group_by=str(f["group_by"]),
      split_file=str(f["split_file"]), split_id_column=str(f["split_id_column"]),
      split_column=str(f["split_column"]), num_folds=int(f["num_folds"]),
      fold=int(f["fold"]), val_fraction=float(f["val_fraction"]),
      test_fraction=float(f["test_fraction"]), seed=int(f["seed"]),
      unpaired=str(f["unpaired"]), skip_corrupt=bool(f["skip_corrupt"]), name=name)

