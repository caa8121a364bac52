"""Named data presets: `data_config(name)` and `get_source(data_cfg, split)`.

Generic kinds: phantoms, image_folder, image_mask_folder, folder (any layout,
by path patterns), arrays (stacked .npy/.npz arrays), medmnist, dicom, tfds, rle_csv
(images with masks run-length encoded in a CSV, the SIIM-ACR layout); for 3-D methods,
volume_folder (whole volumes: a volume file or a DICOM series per case, `volumes.py`)
and phantoms3d (procedural volumes with lesions).
Presets for the local real sets (default root `$MEDREP_DATA_DIR/<folder>` when
`root` is empty): kermany, kvasir_seg, busi, drive, isbi2012_membrane,
kaggle_lungs_ct_64, pneumoniamnist, retinamnist, covid_ct, covid_ct_volume. Manual TFDS presets
(root = the manual download folder; prepared into `tfds_data_dir` on first use):
covid19_radiography, isic2018, kvasir_seg_tfds.

A preset describes a dataset. `data_config(name)` copies only the run choices
(`RUN_CHOICES`: image size, HU window) into the config; every other field stays
at its default, and `get_source` takes the preset's value for a field left at its
default, then the data's (classes, channels, mask classes). So after
`--config.data.name=image_mask_folder --config.data.root=X` nothing of the first
preset survives. Recipes per layout: docs/data.md.
"""
from __future__ import annotations

import difflib
import os
import pathlib
from typing import Any

import ml_collections

from medrep_jax.data import (catalog, folder, masks, pairing, readers, rle_source,
                             tfds_builders, volumes)
from medrep_jax.data.phantoms import Phantoms, Phantoms3D
from medrep_jax.data.sources import DataError, Source, SourceInfo, window_of

# Every field any reader or `build_transforms` reads. 0 / "" / () mean "from the
# preset, else from the data" or "off" as noted.
DEFAULTS: dict[str, Any] = dict(
    name="phantoms",
    root="",                  # folder, or .npz path for medmnist; "" = preset default
    image_size=64,            # output size of build_transforms (phantoms: generated size)
    channels=0,               # 0 = as stored (colour stays colour); 1 = grey, 3 = RGB
    num_classes=0,            # 0 = from the data
    class_names=(),           # () = sorted class folder names (or the label table's)
    has_mask=False,           # (informational; the source reports whether it has masks)
    num_mask_classes=0,       # 0 = from the mask rule (threshold: 2, mask_values: their count)
    val_fraction=0.1,         # carved out of train when there is no val folder
    test_fraction=0.1,
    seed=0,                   # split carving and phantom generation
    skip_corrupt=False,       # skip unreadable files (and images without a mask)
    num_examples=0,           # phantoms per split; 0 = 2048/256/256
    # -- folder layouts (docs/data.md): patterns relative to root; "" = the kind's layout
    images="",                # image pattern, e.g. "{class}/images/*", "{split}/images/{id}_*.tif"
    mask="",                  # mask pattern over the image's parts, e.g. "{dir}/{stem}_mask*.png"
    mask_sub=(),              # or (regex, replacement) on the image path
    mask_choose="",           # regex on mask file names: keep only those masks
    mask_combine="union",     # several masks: union, majority, first or stack
    roi_mask="",              # region (field-of-view) mask pattern -> record "roi"
    unpaired="error",         # an image without a mask: "error" or "skip" (listed)
    image_subdir="",          # image_folder: <class>/<image_subdir>/*
    image_dir="images",       # image_mask_folder
    mask_dir="masks",
    mask_suffix="",
    mask_threshold=127.0,     # on the 0-255 scale ([0, 1] floats x255); -1 keeps stored ids
    mask_values=(),           # e.g. (0, 128, 255) -> ids 0, 1, 2; () = off
    mask_invert=False,        # binary masks: foreground where the stored mask is 0
    class_subdirs=False,      # image_mask_folder: <class>/{images,masks}
    mask_from_label=False,    # mask foreground gets the class id
    labels_from_mask=False,   # label 1 when the mask has foreground
    resize_masks=False,
    labels_csv="",            # label table (relative to root, or absolute)
    label_id_column="id",
    label_columns=(),         # () = every other column
    split_file="",            # the authors' split: CSV, JSON or train.txt/val.txt/test.txt
    split_id_column="",
    split_column="",
    group_by="",              # regex on the path: items of one group stay in one split
    num_folds=0,              # > 0: val is fold `fold` of a k-fold split by group
    fold=0,
    volume="slices",          # volumes/stacks: "slices" (2-D elements) or "whole"
    slice_axis=0,
    slice_stride=1,
    only_foreground=False,    # only slices whose mask has foreground
    stacked=False,            # arrays: .npy/.npz files are stacks of 2-D images (axis 0)
    array_key="",             # the array of an .npz ("" = its only one)
    value_range="auto",       # arrays/volumes without a window -> [0, 1] (formats.to_image)
    window_level=0.0,         # HU window for dicom, arrays, volumes (and Normalize value range);
    window_width=0.0,         # width 0 = no window
    dicom_output="hu",        # "hu" or "unit" (needs a window)
    dicom_frames="first",     # or "all"
    tfds_name="",
    tfds_data_dir="",         # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    tfds_config="",
    normalize="unit",         # build_transforms: "unit", "standardize" or "none"
    resize_mode="stretch",    # "stretch" to image_size, or "pad" (to square, then resize)
    color_norm="",            # "" = off, "reinhard" (modified Reinhard, CIELAB; grey: L)
    color_norm_reference="",  # reference image or folder of images (relative to root)
    color_norm_stats=(),      # or numbers: mean L, a, b, std L, a, b (grey: mean L, std L)
    # -- rle_csv (data/rle_source.py): masks run-length encoded in a CSV (SIIM-ACR layout)
    rle_csv="train-rle.csv",  # the RLE table (relative to root, or absolute)
    rle_id_column="ImageId",  # names an image by relative path, path without suffix, name or stem
    rle_column="EncodedPixels",
    rle_relative=True,        # SIIM's relative starts; False = absolute 1-based (Kaggle)
    rle_order="F",            # pixel numbering: "F" column-major (x * H + y), "C" row-major
    # -- whole volumes (volume_folder, phantoms3d; data/volumes.py); () = not a volume kind
    volume_size=(),           # (D, H, W) the source resizes every volume to (trilinear)
    volume_norm="auto",       # to [0, 1]: "window" (HU window above), "percentile", "minmax",
                              # "none"; "auto" = window when one is set, else percentile
    volume_percentiles=(0.5, 99.5),  # "percentile": per-volume (low, high) -> 0, 1
    dicom_series="one",       # a case folder with several series: "one" (error), "split"
                              # (each series a case) or "stack" (all files one volume)
)

# Preset fields `data_config` copies into the config: choices of the run, not facts of
# the data. Every other preset field is read by `get_source` when the config leaves it
# at its default.
RUN_CHOICES = ("image_size", "window_level", "window_width", "volume_size")

_KINDS = ("phantoms", "image_folder", "image_mask_folder", "folder", "arrays", "medmnist",
          "dicom", "tfds", "rle_csv", "volume_folder", "phantoms3d")
PRESETS: dict[str, dict[str, Any]] = {k: dict(kind=k) for k in _KINDS}
PRESETS["phantoms"].update(image_size=64, channels=1, num_classes=3, has_mask=True,
                           num_mask_classes=3)
PRESETS["arrays"].update(stacked=True)
PRESETS["rle_csv"].update(has_mask=True, num_classes=2)
# CAMContrast Sec. 4.7: volumes of 80 x 96 x 80 (ADNI T1 MRI after Clinica).
PRESETS["volume_folder"].update(volume_size=(80, 96, 80))
PRESETS["phantoms3d"].update(volume_size=(32, 32, 32), channels=1, num_classes=2,
                             has_mask=True, num_mask_classes=2)
PRESETS.update(
    kermany=dict(kind="image_folder", folder="kermany_chest_xray_224", image_size=224,
                 channels=1, num_classes=2),
    kvasir_seg=dict(kind="image_mask_folder", folder="kvasir_seg_256", image_size=256,
                    channels=3, has_mask=True, mask_threshold=127.0),
    # BUSI: some images have a second lesion mask (`*_mask_1.png`): the union of all.
    busi=dict(kind="folder", folder="busi_256", image_size=256, channels=1,
              images="{class}/images/{stem}.png", mask="{class}/mask/{stem}_mask*.png",
              mask_combine="union", class_names=("normal", "benign", "malignant"),
              has_mask=True, mask_from_label=True),
    # DRIVE: vessel masks of the 1st observer; the field-of-view masks are
    # `roi_mask="{split}/mask/{id}_{tag}_mask.gif"` with images "{split}/images/{id}_{tag}.tif".
    drive=dict(kind="folder", folder="drive", image_size=256, has_mask=True,
               images="{split}/images/{id}_{tag}.tif", mask="{split}/1st_manual/{id}_manual1.gif"),
    # ISBI 2012: labels store membranes as 0, so they are inverted (membrane = 1).
    isbi2012_membrane=dict(kind="folder", folder="isbi2012_membrane", image_size=256,
                           channels=1, has_mask=True, images="train/image/{stem}.png",
                           mask="train/label/{stem}.png", mask_invert=True),
    # Kaggle lungs: x_/y_{train,test}.npy stacks, float in [0, 1]; masks binarized at 0.5.
    kaggle_lungs_ct_64=dict(kind="arrays", folder="kaggle_lungs_ct_64", image_size=64,
                            channels=1, has_mask=True, images="dataset/x_{split}.npy",
                            mask="dataset/y_{split}.npy", mask_threshold=127.0),
    pneumoniamnist=dict(kind="medmnist", folder="pneumoniamnist/pneumoniamnist.npz",
                        image_size=28, channels=1, num_classes=2,
                        class_names=("normal", "pneumonia")),
    retinamnist=dict(kind="medmnist", folder="retinamnist/retinamnist.npz", image_size=28,
                     channels=3, num_classes=5),
    covid_ct=dict(kind="dicom", folder="ct_covid19_ny_sbu_dicom", image_size=256, channels=1,
                  window_level=-600.0, window_width=1500.0),
    # The same CT set as volumes: each patient's axial folder holds one single-slice series
    # per study (prior and current), so every series is a case of depth 1 (20 cases of 10
    # patients, kept together by group_by), stretched to a small size for smoke runs.
    covid_ct_volume=dict(kind="volume_folder", folder="ct_covid19_ny_sbu_dicom",
                         images="{patient}/axial", dicom_series="split", group_by="^([^/]+)/",
                         volume_size=(16, 32, 32), channels=1, window_level=-600.0,
                         window_width=1500.0),
    covid19_radiography=dict(kind="tfds_manual", tfds_name="medrep_covid19_radiography",
                             image_size=256, channels=1, num_classes=4, has_mask=True),
    isic2018=dict(kind="tfds_manual", tfds_name="medrep_isic2018", tfds_config="max512",
                  image_size=256, channels=3, has_mask=True),
    kvasir_seg_tfds=dict(kind="tfds_manual", tfds_name="medrep_kvasir_seg", image_size=256,
                         channels=3, has_mask=True),
)


def _preset(name: str) -> dict[str, Any]:
  if name not in PRESETS:
    close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise DataError(f"unknown data name {name!r}.{hint} Known names: {sorted(PRESETS)}")
  return PRESETS[name]


def data_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Complete default data ConfigDict for `name` (every reader field present).

  Only the preset's `RUN_CHOICES` are copied; the dataset's other preset fields are
  read by `get_source` while the config leaves them at their defaults.
  """
  preset = _preset(name)
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise DataError(f"unknown data fields {unknown}; fields: {sorted(DEFAULTS)}")
  fields = {**DEFAULTS, **{k: preset[k] for k in RUN_CHOICES if k in preset}, **overrides}
  fields["name"] = name
  return ml_collections.ConfigDict(fields)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return tuple(a) == tuple(b)
  return type(a) is type(b) and a == b or (
      isinstance(a, (int, float)) and isinstance(b, (int, float))
      and not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b))


def fields_of(data_cfg: Any) -> dict[str, Any]:
  """The values `get_source` uses: the config's, with fields left at their default
  taken from the preset of `data_cfg.name`."""
  preset = _preset(data_cfg.name)
  out = {}
  for key, default in DEFAULTS.items():
    value = data_cfg.get(key, default)
    if key in preset and _same(value, default):
      value = preset[key]
    out[key] = value
  return out


def root_of(cfg: Any) -> pathlib.Path:
  """The data folder of a data config: `data.root`, else the preset's folder under
  MEDREP_DATA_DIR (DataError naming what to set)."""
  return _root(cfg, _preset(cfg.name))


def _root(cfg: Any, preset: dict[str, Any]) -> pathlib.Path:
  root = cfg.get("root", "")
  if root:
    return pathlib.Path(os.path.expanduser(str(root)))
  if "folder" not in preset:
    raise DataError(f"data {cfg.name!r} needs data.root (the data folder or file)")
  env = os.environ.get("MEDREP_DATA_DIR")
  if not env:
    raise DataError(f"data {cfg.name!r}: set data.root, or MEDREP_DATA_DIR to the folder that "
                    f"holds {preset['folder']}")
  return pathlib.Path(env) / preset["folder"]


def _threshold(value: Any) -> float | None:
  return None if value is None or float(value) < 0 else float(value)


def _tfds_dir(get) -> str:
  return os.path.expanduser(get("tfds_data_dir") or os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _join(*parts: str) -> str:
  return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def folder_spec(f: dict[str, Any], kind: str) -> catalog.Spec:
  """The file layout of a folder kind from resolved fields (`fields_of`)."""
  images, mask = str(f["images"]), str(f["mask"])
  suffixes, group_by, unmatched = (), str(f["group_by"]), "error"
  cls = "{class}" if f["class_subdirs"] else ""  # class_names alone only orders classes
  if kind == "image_folder" and not images:
    images = _join("{class}", f["image_subdir"], "*")
  elif kind == "image_mask_folder" and not images:
    images = _join(cls, f["image_dir"], "*")
    if not mask and not f["mask_sub"]:
      mask = _join(cls, f["mask_dir"], "{stem}" + str(f["mask_suffix"]) + ".*")
  elif kind == "dicom":
    images, suffixes = images or "**/*.dcm", (".dcm",)
    if not group_by:
      group_by, unmatched = "^([^/]+)/", "own"  # the patient folder
  elif kind == "arrays":
    suffixes = (".npy", ".npz")
  return catalog.Spec(
      images=images or "**/*",
      mask=pairing.MaskRule(pattern=mask, sub=tuple(f["mask_sub"]),
                            choose=str(f["mask_choose"])),
      roi=pairing.MaskRule(pattern=str(f["roi_mask"]), field="data.roi_mask"),
      suffixes=suffixes, class_names=tuple(f["class_names"]),
      labels_csv=str(f["labels_csv"]), label_id_column=str(f["label_id_column"]),
      label_columns=tuple(f["label_columns"]), split_file=str(f["split_file"]),
      split_id_column=str(f["split_id_column"]), split_column=str(f["split_column"]),
      group_by=group_by, group_unmatched=unmatched, num_folds=int(f["num_folds"]),
      fold=int(f["fold"]), val_fraction=float(f["val_fraction"]),
      test_fraction=float(f["test_fraction"]), seed=int(f["seed"]),
      unpaired="skip" if f["skip_corrupt"] else str(f["unpaired"]))


def folder_decode(f: dict[str, Any], kind: str) -> folder.Decode:
  """How a folder kind decodes files, from resolved fields (`fields_of`)."""
  values = masks.MaskValues(threshold=_threshold(f["mask_threshold"]),
                            values=tuple(f["mask_values"]),
                            num_classes=int(f["num_mask_classes"]),
                            invert=bool(f["mask_invert"]))
  return folder.Decode(
      mask_values=values, mask_combine=str(f["mask_combine"]),
      resize_masks=bool(f["resize_masks"]), mask_from_label=bool(f["mask_from_label"]),
      labels_from_mask=bool(f["labels_from_mask"]), window=window_of(f),
      dicom_output=str(f["dicom_output"]), frames=str(f["dicom_frames"]),
      volume=str(f["volume"]), slice_axis=int(f["slice_axis"]),
      slice_stride=int(f["slice_stride"]), only_foreground=bool(f["only_foreground"]),
      stacked=bool(f["stacked"]) or kind == "arrays", array_key=str(f["array_key"]),
      value_range=str(f["value_range"]))


FOLDER_KINDS = ("image_folder", "image_mask_folder", "folder", "arrays", "dicom")


def get_source(data_cfg: Any, split: str) -> Source:
  """Builds the `Source` for `split` from a data ConfigDict (see `data_config`)."""
  preset = _preset(data_cfg.name)
  f = fields_of(data_cfg)
  get = f.__getitem__
  kind = preset["kind"]
  fractions = dict(val_fraction=float(get("val_fraction")),
                   test_fraction=float(get("test_fraction")), seed=int(get("seed")))
  channels = int(get("channels")) or None
  class_names = tuple(get("class_names")) or None
  if kind == "phantoms":
    return Phantoms(split, num_examples=int(get("num_examples")) or None,
                    image_size=int(get("image_size")), channels=channels or 1,
                    num_classes=int(get("num_classes")) or 3, seed=int(get("seed")))
  if kind in FOLDER_KINDS:
    root = _root(data_cfg, preset)
    if kind == "image_mask_folder" and not f["images"]:
      readers.check_mask_dirs(root, str(f["image_dir"]), str(f["mask_dir"]))
    return folder.FolderSource(
        root, split, spec=folder_spec(f, kind), decode=folder_decode(f, kind),
        channels=channels, num_classes=int(get("num_classes")) or None,
        skip_corrupt=bool(get("skip_corrupt")), name=data_cfg.name)
  if kind == "rle_csv":
    return rle_source.from_fields(_root(data_cfg, preset), split, f, name=data_cfg.name)
  if kind == "volume_folder":
    return volumes.from_fields(_root(data_cfg, preset), split, f, name=data_cfg.name)
  if kind == "phantoms3d":
    return Phantoms3D(split, num_examples=int(get("num_examples")) or None,
                      volume_size=tuple(get("volume_size")), channels=channels or 1,
                      seed=int(get("seed")))
  if kind == "medmnist":
    return readers.MedMNIST(_root(data_cfg, preset), split,
                            num_classes=int(get("num_classes")) or None,
                            class_names=class_names, channels=channels, name=data_cfg.name)
  name, config = get("tfds_name"), get("tfds_config") or None
  if not name:
    raise DataError(f"data {data_cfg.name!r} needs data.tfds_name")
  if kind == "tfds_manual":
    try:
      tfds_builders.find_builder_dir(name, _tfds_dir(get), config)
    except DataError:
      root = data_cfg.get("root", "")
      tfds_builders.prepare_manual(name, _tfds_dir(get), manual_dir=root or None,
                                   config=config or "native", **fractions)
  return tfds_builders.TfdsSource(name, split, data_dir=_tfds_dir(get), config=config)


def get_info(data_cfg: Any) -> SourceInfo:
  """The dataset's `SourceInfo`: from the train split, or from every item when the data
  has no train split (a folder holding only `test/`)."""
  try:
    return get_source(data_cfg, "train").info
  except DataError as e:
    if "no train split" not in str(e):
      raise
    return get_source(data_cfg, "all").info
