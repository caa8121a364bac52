"""Named data presets: `data_config(name)` and `get_source(data_cfg, split)`.

Generic kinds: phantoms, image_folder, image_mask_folder, medmnist, dicom,
tfds. Presets for the local real sets (default root `$MEDREP_DATA_DIR/<folder>`
when `root` is empty): kermany, kvasir_seg, busi, pneumoniamnist, retinamnist,
covid_ct. Manual TFDS presets (root = the manual download folder; prepared
into `tfds_data_dir` on first use): covid19_radiography, isic2018,
kvasir_seg_tfds.
"""
from __future__ import annotations

import difflib
import os
import pathlib
from typing import Any

import ml_collections

from medrep_jax.data import readers, tfds_builders
from medrep_jax.data.dicom import DicomFolder
from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.sources import DataError, Source, window_of

# Every field any reader or `build_transforms` reads. 0 / "" / () / None mean
# "infer" or "off" as noted.
DEFAULTS: dict[str, Any] = dict(
    name="phantoms",
    root="",                  # folder, or .npz path for medmnist; "" = preset default
    image_size=64,            # output size of build_transforms (phantoms: generated size)
    channels=1,               # output channels (readers convert at decode)
    num_classes=0,            # 0 = infer from the data
    class_names=(),           # () = sorted class folder names
    has_mask=False,           # the task uses segmentation masks
    num_mask_classes=2,
    val_fraction=0.1,         # carved out of train when there is no val folder
    test_fraction=0.1,
    seed=0,                   # split carving and phantom generation
    skip_corrupt=False,
    num_examples=0,           # phantoms per split; 0 = 2048/256/256
    image_subdir="",          # image_folder: <class>/<image_subdir>/*
    image_dir="images",       # image_mask_folder
    mask_dir="masks",
    mask_suffix="",
    mask_threshold=127,       # -1 keeps stored values as class ids
    mask_values=(),           # e.g. (0, 128, 255) -> ids 0, 1, 2; () = off
    class_subdirs=False,      # image_mask_folder: <class>/{images,masks}
    mask_from_label=False,
    labels_from_mask=False,
    resize_masks=False,
    window_level=0.0,         # HU window for dicom (and Normalize value range);
    window_width=0.0,         # width 0 = no window
    dicom_output="hu",        # "hu" or "unit" (needs a window)
    dicom_frames="first",     # or "all"
    tfds_name="",
    tfds_data_dir="",         # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    tfds_config="",
    normalize="unit",         # build_transforms: "unit", "standardize" or "none"
)

_KINDS = ("phantoms", "image_folder", "image_mask_folder", "medmnist", "dicom", "tfds")
PRESETS: dict[str, dict[str, Any]] = {k: dict(kind=k) for k in _KINDS}
PRESETS["phantoms"].update(image_size=64, channels=1, num_classes=3, has_mask=True,
                           num_mask_classes=3)
PRESETS.update(
    kermany=dict(kind="image_folder", folder="kermany_chest_xray_224", image_size=224,
                 channels=1, num_classes=2),
    kvasir_seg=dict(kind="image_mask_folder", folder="kvasir_seg_256", image_size=256,
                    channels=3, has_mask=True, mask_threshold=127),
    busi=dict(kind="image_mask_folder", folder="busi_256", image_size=256, channels=1,
              num_classes=3, class_names=("normal", "benign", "malignant"), has_mask=True,
              num_mask_classes=3, mask_dir="mask", mask_suffix="_mask", class_subdirs=True,
              mask_from_label=True),
    pneumoniamnist=dict(kind="medmnist", folder="pneumoniamnist/pneumoniamnist.npz",
                        image_size=28, channels=1, num_classes=2,
                        class_names=("normal", "pneumonia")),
    retinamnist=dict(kind="medmnist", folder="retinamnist/retinamnist.npz", image_size=28,
                     channels=3, num_classes=5),
    covid_ct=dict(kind="dicom", folder="ct_covid19_ny_sbu_dicom", image_size=256, channels=1,
                  window_level=-600.0, window_width=1500.0),
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
  """Complete default data ConfigDict for `name` (every reader field present)."""
  preset = _preset(name)
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise DataError(f"unknown data fields {unknown}; fields: {sorted(DEFAULTS)}")
  fields = {**DEFAULTS, **{k: v for k, v in preset.items() if k in DEFAULTS}, **overrides}
  fields["name"] = name
  return ml_collections.ConfigDict(fields)


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


def _threshold(value: Any) -> int | None:
  return None if value is None or int(value) < 0 else int(value)


def _tfds_dir(get) -> str:
  return os.path.expanduser(get("tfds_data_dir") or os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def get_source(data_cfg: Any, split: str) -> Source:
  """Builds the `Source` for `split` from a data ConfigDict (see `data_config`)."""
  preset = _preset(data_cfg.name)
  defaults = {**DEFAULTS, **preset}

  def get(key: str) -> Any:
    return data_cfg.get(key, defaults[key])

  kind = preset["kind"]
  fractions = dict(val_fraction=float(get("val_fraction")),
                   test_fraction=float(get("test_fraction")), seed=int(get("seed")))
  channels = get("channels") or None
  class_names = tuple(get("class_names")) or None
  if kind == "phantoms":
    return Phantoms(split, num_examples=int(get("num_examples")) or None, image_size=int(get("image_size")),
                    channels=channels or 1, num_classes=int(get("num_classes")) or 3,
                    seed=int(get("seed")))
  if kind == "image_folder":
    return readers.ImageFolder(
        _root(data_cfg, preset), split, channels=channels, image_subdir=get("image_subdir"),
        class_names=class_names, num_classes=get("num_classes") or None,
        skip_corrupt=bool(get("skip_corrupt")), name=data_cfg.name, **fractions)
  if kind == "image_mask_folder":
    return readers.ImageMaskFolder(
        _root(data_cfg, preset), split, image_dir=get("image_dir"), mask_dir=get("mask_dir"),
        mask_suffix=get("mask_suffix"), mask_threshold=_threshold(get("mask_threshold")),
        mask_values=tuple(get("mask_values")) or None, num_mask_classes=get("num_mask_classes"),
        channels=channels, classes=class_names or bool(get("class_subdirs")),
        mask_from_label=bool(get("mask_from_label")),
        labels_from_mask=bool(get("labels_from_mask")), resize_masks=bool(get("resize_masks")),
        skip_corrupt=bool(get("skip_corrupt")), name=data_cfg.name, **fractions)
  if kind == "medmnist":
    return readers.MedMNIST(_root(data_cfg, preset), split,
                            num_classes=get("num_classes") or None, class_names=class_names,
                            channels=channels, name=data_cfg.name)
  if kind == "dicom":
    window = window_of(data_cfg)
    return DicomFolder(_root(data_cfg, preset), split, window=window,
                       output=get("dicom_output"), frames=get("dicom_frames"),
                       skip_corrupt=bool(get("skip_corrupt")), name=data_cfg.name, **fractions)
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
