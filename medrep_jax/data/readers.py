"""Generic readers for user data: image folders, image+mask folders, MedMNIST.

Split layout (ImageFolder, ImageMaskFolder, DicomFolder): if `root/<split>/`
exists it is read as is. Splits without a folder are carved deterministically
out of `root/train/` (or out of `root/` when there are no split folders) with
`val_fraction`/`test_fraction` and `seed`; carving is stratified by class. The
extra split "all" reads everything without carving.
"""
from __future__ import annotations

import logging
import os
import pathlib
import zipfile
from typing import Sequence

import numpy as np

from medrep_jax.data import imageio
from medrep_jax.data.sources import (SPLITS, DataError, Record, Source, SourceInfo, carve_split,
                                     check_fractions, check_split)

PathLike = str | os.PathLike


def resolve_split(root: pathlib.Path, split: str, val_fraction: float,
                  test_fraction: float) -> tuple[pathlib.Path, str, float, float]:
  """Maps (root, split) to (base folder, split to carve, val/test fractions)."""
  check_split(split)
  check_fractions(val_fraction, test_fraction)
  if not root.is_dir():
    raise DataError(f"data root folder {root} does not exist; check the path (data.root)")
  present = {s for s in SPLITS if (root / s).is_dir()}
  if not present or split == "all" and "train" not in present:
    return root, split, val_fraction, test_fraction
  if split in present and split != "train":
    return root / split, "all", 0.0, 0.0
  if "train" not in present:
    raise DataError(f"{root} has split folders {sorted(present)} but no {split}/ or train/ "
                    f"folder to carve {split!r} from")
  return (root / "train", split, 0.0 if "val" in present else val_fraction,
          0.0 if "test" in present else test_fraction)


def _class_folders(roots: Sequence[pathlib.Path]) -> list[str]:
  names = set()
  for r in roots:
    if r.is_dir():
      names |= {p.name for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")}
  return sorted(names)


def _split_roots(root: pathlib.Path) -> list[pathlib.Path]:
  present = [root / s for s in SPLITS if (root / s).is_dir()]
  return present or [root]


class ImageFolder(Source):
  """Classification images in class subfolders: `<base>/<class>[/<image_subdir>]/*`.

  Class ids follow `class_names` (default: sorted folder names across all
  split folders). Supported files: jpg, jpeg, png, bmp, tif, tiff, gif.
  """

  def __init__(self, root: PathLike, split: str = "train", *, channels: int | None = None,
               image_subdir: str = "", class_names: Sequence[str] | None = None,
               num_classes: int | None = None, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False,
               name: str | None = None):
    root = pathlib.Path(root)
    base, carve, vf, tf = resolve_split(root, split, val_fraction, test_fraction)
    names = list(class_names) if class_names else _class_folders(_split_roots(root))
    if num_classes is not None and len(names) > num_classes:
      raise DataError(f"{root}: found {len(names)} class folders {names}, so labels reach "
                      f"{len(names) - 1}, outside [0, num_classes={num_classes})")
    paths, labels = [], []
    for label, cls in enumerate(names):
      found = imageio.list_images(base / cls / image_subdir)
      paths += found
      labels += [label] * len(found)
    keep = carve_split(labels, carve, val_fraction=vf, test_fraction=tf, seed=seed)
    if not len(keep):
      sub = f"/{image_subdir}" if image_subdir else ""
      raise DataError(
          f"no images for split {split!r} in {base} (classes {names}). Expected layout:\n"
          f"  {root}/<class>{sub}/*.png|jpg|...  or  {root}/{{train,val,test}}/<class>{sub}/*\n"
          "with one folder per class")
    self.paths = [paths[i] for i in keep]
    self.labels = np.asarray(labels, np.int32)[keep]
    self.channels = channels or imageio.probe_channels(paths)
    self.skip_corrupt = skip_corrupt
    self.info = SourceInfo(name=name or root.name, num_classes=num_classes or len(names),
                           class_names=tuple(names), channels=self.channels)

  def _num_elements(self) -> int:
    return len(self.paths)

  def _load(self, index: int) -> Record:
    return {"image": imageio.decode_image(self.paths[index], self.channels),
            "label": np.int32(self.labels[index])}


class ImageMaskFolder(Source):
  """Segmentation pairs `<base>[/<class>]/{image_dir,mask_dir}/*`, paired by stem.

  A mask file is named `<image stem><mask_suffix>.<any ext>`. Mask values:
  `mask_threshold` (default 127) binarizes (> threshold -> 1); with
  `mask_threshold=None`, `mask_values` maps stored values to ids by nearest
  value (e.g. (0, 128, 255) -> 0, 1, 2), or stored values are the class ids
  (give `num_mask_classes`). Labels: `classes` (True or a sequence of class
  folder names) reads class subfolders and gives class-id labels
  (`mask_from_label` then marks foreground with the label id);
  `labels_from_mask` gives label 1 when the mask has foreground. A mask whose
  size differs from its image raises, unless `resize_masks` (nearest resize).
  """

  def __init__(self, root: PathLike, split: str = "train", *, image_dir: str = "images",
               mask_dir: str = "masks", mask_suffix: str = "", mask_threshold: int | None = 127,
               mask_values: Sequence[int] | None = None, num_mask_classes: int | None = None,
               channels: int | None = None, classes: bool | Sequence[str] = False,
               mask_from_label: bool = False, labels_from_mask: bool = False,
               resize_masks: bool = False, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False,
               name: str | None = None):
    root = pathlib.Path(root)
    base, carve, vf, tf = resolve_split(root, split, val_fraction, test_fraction)
    if classes is True:
      names = _class_folders(_split_roots(root))
    else:
      names = list(classes or [])
    if labels_from_mask and names:
      raise DataError("use either classes or labels_from_mask, not both")
    if mask_from_label and not names:
      raise DataError("mask_from_label needs class folders (classes=True or a list of names)")
    self.skip_corrupt = skip_corrupt
    pairs, labels = [], []
    for label, sub in enumerate(names or [""]):
      found = self._pair(base / sub, image_dir, mask_dir, mask_suffix)
      pairs += found
      labels += [label] * len(found)
    keep = carve_split(labels, carve, val_fraction=vf, test_fraction=tf, seed=seed)
    if not len(keep):
      cls = "<class>/" if names else ""
      raise DataError(
          f"no image/mask pairs for split {split!r} in {base} (data.image_dir={image_dir!r}, "
          f"data.mask_dir={mask_dir!r}). Expected layout:\n"
          f"  {root}/{cls}{image_dir}/<stem>.jpg|png|...\n"
          f"  {root}/{cls}{mask_dir}/<stem>{mask_suffix}.png|jpg|...\n"
          f"(optionally inside {root}/{{train,val,test}}/)")
    self.image_paths = [pairs[i][0] for i in keep]
    self.mask_paths = [pairs[i][1] for i in keep]
    self.labels = np.asarray(labels, np.int32)[keep] if names else None
    self.channels = channels or imageio.probe_channels(self.image_paths)
    self.mask_threshold = mask_threshold
    self.mask_from_label = mask_from_label
    self.labels_from_mask = labels_from_mask
    self.resize_masks = resize_masks
    self._lut = None
    if mask_threshold is not None:
      n_mask = len(names) if mask_from_label else 2
    elif mask_values is not None:
      values = np.asarray(mask_values, np.float64)
      self._lut = np.abs(np.arange(256)[:, None] - values[None, :]).argmin(1).astype(np.uint8)
      n_mask = len(values)
    elif num_mask_classes is not None:
      n_mask = num_mask_classes
    else:
      raise DataError("with mask_threshold=None pass mask_values or num_mask_classes")
    self.num_mask_classes = n_mask
    if labels_from_mask:
      num_classes, class_names = 2, ("no_foreground", "foreground")
    else:
      num_classes, class_names = len(names), tuple(names)
    self.info = SourceInfo(name=name or root.name, num_classes=num_classes,
                           class_names=class_names, channels=self.channels, has_mask=True,
                           num_mask_classes=n_mask)

  def _pair(self, folder: pathlib.Path, image_dir: str, mask_dir: str,
            suffix: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    if imageio.list_images(folder / image_dir) and not (folder / mask_dir).is_dir():
      present = sorted(p.name for p in folder.iterdir() if p.is_dir())
      raise DataError(f"the mask folder {folder / mask_dir} does not exist (data.mask_dir="
                      f"{mask_dir!r}); folders in {folder}: {present}. Set data.mask_dir to "
                      f"the folder that holds the masks")
    masks = {}
    for p in imageio.list_images(folder / mask_dir):
      if p.stem.endswith(suffix):
        masks.setdefault(p.stem[:len(p.stem) - len(suffix)], p)
    pairs = []
    for img in imageio.list_images(folder / image_dir):
      if img.stem in masks:
        pairs.append((img, masks[img.stem]))
        continue
      msg = (f"image {img} has no mask: expected {folder / mask_dir}/{img.stem}{suffix}.<ext> "
             f"(data.mask_dir={mask_dir!r}, data.mask_suffix={suffix!r}). Fix those fields, "
             "add the mask, remove the image, or set data.skip_corrupt=True")
      if not self.skip_corrupt:
        raise DataError(msg)
      logging.warning("skip_corrupt: %s", msg)
      self.num_skipped_at_init += 1
    return pairs

  def _num_elements(self) -> int:
    return len(self.image_paths)

  def _load(self, index: int) -> Record:
    img_path, mask_path = self.image_paths[index], self.mask_paths[index]
    image = imageio.decode_image(img_path, self.channels)
    raw = imageio.decode_mask(mask_path, grey=self._lut is not None or
                              self.mask_threshold is not None)
    if raw.shape != image.shape[:2] and self.resize_masks:
      raw = imageio.resize_mask(raw, image.shape[:2])
    if raw.shape != image.shape[:2]:
      raise DataError(f"mask {mask_path} has shape {raw.shape} but image {img_path} has shape "
                      f"{image.shape[:2]} (H, W); fix or remove the pair")
    if self.mask_threshold is not None:
      mask = (raw > self.mask_threshold).astype(np.uint8)
    elif self._lut is not None:
      mask = self._lut[raw]
    else:
      mask = raw
      if mask.size and int(mask.max()) >= self.num_mask_classes:
        raise DataError(f"mask {mask_path} has id {int(mask.max())}, outside "
                        f"[0, num_mask_classes={self.num_mask_classes})")
    record = {"image": image, "mask": mask}
    if self.labels is not None:
      record["label"] = np.int32(self.labels[index])
      if self.mask_from_label:
        record["mask"] = mask * np.uint8(self.labels[index])
    elif self.labels_from_mask:
      record["label"] = np.int32(mask.any())
    return record


def npz_array(npz, path: pathlib.Path, key: str) -> np.ndarray:
  """`npz[key]`, with a DataError naming the file and key when it cannot be read (an
  object array needs pickle, which medrep_jax never enables: it would run code)."""
  try:
    return np.asarray(npz[key])
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise DataError(
          f"{path}: array {key!r} is stored as Python objects (dtype=object), which "
          f"medrep_jax does not load because unpickling can run code. Save it as a numeric "
          f"array instead, e.g. np.savez(..., {key}=np.stack(items).astype(np.uint8)) for "
          f"images of one size") from e
    raise DataError(f"cannot read array {key!r} from {path}: {e}") from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"cannot read array {key!r} from {path} (damaged file?): {e}") from e


def _npz_shape(path: pathlib.Path, key: str) -> tuple[int, ...]:
  """Shape of one array in an .npz, read from its .npy header (no decompression)."""
  with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return tuple(read(f)[0])


class MedMNIST(Source):
  """A MedMNIST `.npz`: `{split}_images` (N,H,W[,3]) uint8 and `{split}_labels` (N,K).

  K = 1 is single-label (np.int32 labels); K > 1 is multi-label (float32
  multi-hot). `num_classes` defaults to max label + 1 over all splits (K for
  multi-label). Arrays load lazily, once per process.
  """

  def __init__(self, path: PathLike, split: str = "train", *, num_classes: int | None = None,
               class_names: Sequence[str] | None = None, channels: int | None = None,
               name: str | None = None):
    check_split(split, allow_all=False)
    self.path = pathlib.Path(path)
    self.split = split
    if not self.path.is_file():
      raise DataError(f"MedMNIST file {self.path} does not exist; pass the path to the .npz")
    try:
      npz = np.load(self.path)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"cannot read {self.path} as an .npz file: {e}") from e
    with npz:
      keys = sorted(npz.files)
      for key in (f"{split}_images", f"{split}_labels"):
        if key not in keys:
          raise DataError(f"{self.path} has no key {key!r}; keys present: {keys}. A MedMNIST "
                          "file needs {train,val,test}_images and {train,val,test}_labels")
      labels = npz_array(npz, self.path, f"{split}_labels")
      all_labels = [npz_array(npz, self.path, k) for k in keys if k.endswith("_labels")]
    img_shape = _npz_shape(self.path, f"{split}_images")
    if labels.ndim == 1:
      labels = labels[:, None]
    if labels.ndim != 2 or len(labels) != img_shape[0] or len(img_shape) not in (3, 4):
      raise DataError(f"{self.path}: {split}_images has shape {img_shape} and {split}_labels "
                      f"{labels.shape}; expected (N,H,W[,C]) and (N,K) with the same N")
    self.multi_label = labels.shape[1] > 1
    if num_classes is None:
      num_classes = labels.shape[1] if self.multi_label else int(
          max(int(l.max()) for l in all_labels if l.size) + 1)
    if self.multi_label and labels.shape[1] != num_classes:
      raise DataError(f"{self.path}: {split}_labels has shape {labels.shape}, so multi-hot "
                      f"vectors of size {labels.shape[1]}, but num_classes={num_classes}")
    if self.multi_label:
      bad = np.flatnonzero(((labels != 0) & (labels != 1)).any(1))
    else:
      bad = np.flatnonzero(((labels < 0) | (labels >= num_classes)).any(1))
    if len(bad):
      raise DataError(f"{self.path}: {split}_labels[{bad[0]}] = {labels[bad[0]].tolist()} is "
                      f"outside [0, num_classes={num_classes}){' or not 0/1' * self.multi_label}; "
                      "fix num_classes or the labels")
    self.labels = labels.astype(np.float32) if self.multi_label else labels[:, 0].astype(np.int32)
    stored = 1 if len(img_shape) == 3 else img_shape[-1]
    self.channels = channels or stored
    self._images = None
    names = tuple(class_names) if class_names else tuple(str(i) for i in range(num_classes))
    self.info = SourceInfo(name=name or self.path.stem, num_classes=num_classes,
                           class_names=names, channels=self.channels,
                           multi_label=self.multi_label)

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_images"] = None  # reloaded lazily in the worker
    return state

  def _num_elements(self) -> int:
    return len(self.labels)

  def _load(self, index: int) -> Record:
    if self._images is None:
      with np.load(self.path) as npz:
        images = npz_array(npz, self.path, f"{self.split}_images")
      if images.dtype != np.uint8:
        raise DataError(f"{self.path}: {self.split}_images has dtype {images.dtype}; "
                        "expected uint8")
      self._images = images if images.ndim == 4 else images[..., None]
    image = imageio.convert_channels(self._images[index], self.channels)
    label = self.labels[index]
    return {"image": image, "label": label.copy() if self.multi_label else np.int32(label)}
