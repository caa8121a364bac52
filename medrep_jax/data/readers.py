"""Generic readers for user data: image folders, image+mask folders, MedMNIST.

`ImageFolder` and `ImageMaskFolder` are configurations of the one folder reader
(`folder.FolderSource`: patterns, pairing, splits in `catalog.py`). Split layout:
if `root/<split>/` exists it is read as is. Splits without a folder are carved
deterministically out of `root/train/` (or out of `root/` when there are no split
folders) with `val_fraction`/`test_fraction` and `seed`; carving is stratified by
class. The extra split "all" reads everything without carving. A folder holding
only `test/` reads as split "test" (or "all").
"""
from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Sequence

import numpy as np

from medrep_jax.data import catalog, folder, imageio, masks, pairing
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, check_split

PathLike = str | os.PathLike


def _join(*parts: str) -> str:
  return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class ImageFolder(folder.FolderSource):
  """Classification images in class subfolders: `<base>/<class>[/<image_subdir>]/*`.

  Class ids follow `class_names` (default: sorted folder names across all
  split folders). Supported files: `formats.SUPPORTED` (images, arrays, volumes)
  and DICOM. `channels=None` keeps the stored channels.
  """

  def __init__(self, root: PathLike, split: str = "train", *, channels: int | None = None,
               image_subdir: str = "", class_names: Sequence[str] | None = None,
               num_classes: int | None = None, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False,
               group_by: str = "", name: str | None = None):
    sub = f"/{image_subdir}" if image_subdir else ""
    spec = catalog.Spec(
        images=_join("{class}", image_subdir, "*"), class_names=tuple(class_names or ()),
        group_by=group_by, val_fraction=val_fraction, test_fraction=test_fraction,
        seed=seed, hint=(f"Expected layout:\n  {root}/<class>{sub}/*.png|jpg|...  or  "
                         f"{root}/{{train,val,test}}/<class>{sub}/*\nwith one folder per "
                         "class"))
    super().__init__(root, split, spec=spec, channels=channels, num_classes=num_classes,
                     skip_corrupt=skip_corrupt, name=name)
    self.paths = [self.root / it.path for it in self.catalog.items]
    self.labels = np.asarray([it.label for it in self.catalog.items], np.int32)


def check_mask_dirs(root: pathlib.Path, image_dir: str, mask_dir: str) -> None:
  """A DataError when images sit in `image_dir` but `mask_dir` is missing beside it."""
  if not root.is_dir():
    return
  bases = [root] + [p for p in root.iterdir() if p.is_dir()]
  bases += [q for p in bases[1:] for q in p.iterdir() if q.is_dir()]
  for base in bases:
    if imageio.list_images(base / image_dir) and not (base / mask_dir).is_dir():
      present = sorted(p.name for p in base.iterdir() if p.is_dir())
      raise DataError(f"the mask folder {base / mask_dir} does not exist (data.mask_dir="
                      f"{mask_dir!r}); folders in {base}: {present}. Set data.mask_dir to "
                      f"the folder that holds the masks. Check with "
                      f"`{pairing.INSPECT_HINT}`")


class ImageMaskFolder(folder.FolderSource):
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
  An image without a mask raises, unless `skip_corrupt` (then it is skipped and
  listed in `skipped`). For other layouts use `folder.FolderSource` patterns
  (`data.images`, `data.mask`).
  """

  def __init__(self, root: PathLike, split: str = "train", *, image_dir: str = "images",
               mask_dir: str = "masks", mask_suffix: str = "", mask_threshold: int | None = 127,
               mask_values: Sequence[int] | None = None, num_mask_classes: int | None = None,
               channels: int | None = None, classes: bool | Sequence[str] = False,
               mask_from_label: bool = False, labels_from_mask: bool = False,
               resize_masks: bool = False, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False,
               group_by: str = "", name: str | None = None):
    root = pathlib.Path(root)
    check_mask_dirs(root, image_dir, mask_dir)
    cls = "{class}" if classes else ""
    names = tuple(classes) if classes and classes is not True else ()
    spec = catalog.Spec(
        images=_join(cls, image_dir, "*"),
        mask=pairing.MaskRule(pattern=_join(cls, mask_dir, "{stem}" + mask_suffix + ".*")),
        class_names=names, group_by=group_by, unpaired="skip" if skip_corrupt else "error",
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        hint=(f"Expected layout:\n  {root}/{cls + '/' if cls else ''}{image_dir}/<stem>.jpg|png|...\n"
              f"  {root}/{cls + '/' if cls else ''}{mask_dir}/<stem>{mask_suffix}.png|jpg|...\n"
              f"(optionally inside {root}/{{train,val,test}}/)"))
    values = masks.MaskValues(
        threshold=mask_threshold, values=tuple(mask_values or ()),
        num_classes=int(num_mask_classes or 0))
    decode = folder.Decode(mask_values=values, mask_combine="first", resize_masks=resize_masks,
                           mask_from_label=mask_from_label, labels_from_mask=labels_from_mask)
    super().__init__(root, split, spec=spec, decode=decode, channels=channels,
                     skip_corrupt=skip_corrupt, name=name)
    self.image_paths = [self.root / it.path for it in self.catalog.items]
    self.mask_paths = [self.root / it.masks[0] for it in self.catalog.items]
    labelled = self.catalog.items and self.catalog.items[0].label is not None
    self.labels = (np.asarray([it.label for it in self.catalog.items], np.int32)
                   if labelled else None)


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
