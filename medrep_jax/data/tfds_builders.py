"""TFDS builders writing array_record files, with no TensorFlow needed.

Features are `tfds.features.Tensor` only: the image is stored as encoded PNG
bytes (uint8) or raw little-endian float32 bytes (e.g. CT in HU), plus its
shape; the mask as PNG bytes; labels as ints (float32 multi-hot when multi-
label). The `SourceInfo` is kept in the dataset metadata, so `TfdsSource`
rebuilds records exactly. Examples keep the source order (shuffling is
disabled); grain shuffles at load time.

  path = build_from_source({"train": Phantoms("train", num_examples=16)},
                           name="phantoms_tiny", data_dir=tmp)
  src = TfdsSource("phantoms_tiny", "train", data_dir=tmp)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import types
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from medrep_jax.data import imageio
from medrep_jax.data.readers import ImageMaskFolder
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo

PathLike = str | os.PathLike
VERSION = "1.0.0"


def _features(info: SourceInfo) -> tfds.features.FeaturesDict:
  feats: dict[str, Any] = {
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "image_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
      "source_index": tfds.features.Tensor(shape=(), dtype=np.int64),
  }
  if info.num_classes and info.multi_label:
    feats["label"] = tfds.features.Tensor(shape=(info.num_classes,), dtype=np.float32)
  elif info.num_classes:
    feats["label"] = tfds.features.Tensor(shape=(), dtype=np.int32)
  if info.has_mask:
    feats["mask"] = tfds.features.Tensor(shape=(), dtype=np.object_)
  return tfds.features.FeaturesDict(feats)


def encode_record(record: Record, info: SourceInfo) -> dict[str, Any]:
  """Record -> TFDS example (PNG or raw float32 image bytes)."""
  image = np.asarray(record["image"])
  if info.image_dtype == "float32":
    data = np.ascontiguousarray(image, dtype="<f4").tobytes()
  else:
    data = imageio.encode_png(image)
  ex = {"image": data, "image_shape": np.asarray(image.shape, np.int32),
        "source_index": np.int64(record["index"])}
  if "label" in record and info.num_classes:
    ex["label"] = record["label"]
  if info.has_mask:
    ex["mask"] = imageio.encode_png(np.asarray(record["mask"], np.uint8))
  return ex


def decode_example(ex: Mapping[str, Any], info: SourceInfo) -> Record:
  """TFDS example -> record (inverse of `encode_record`, byte-exact)."""
  shape = tuple(int(s) for s in ex["image_shape"])
  if info.image_dtype == "float32":
    image = np.frombuffer(ex["image"], dtype="<f4").reshape(shape).astype(np.float32)
  else:
    image = imageio.decode_image(bytes(ex["image"]))
    if image.shape != shape:
      raise DataError(f"decoded PNG has shape {image.shape}, the dataset says {shape}")
  record = {"image": image}
  if "label" in ex:
    record["label"] = (np.asarray(ex["label"], np.float32) if info.multi_label
                       else np.int32(ex["label"]))
  if "mask" in ex:
    record["mask"] = imageio.decode_mask(bytes(ex["mask"]), grey=False)
  return record


def _encoded(source: Source, info: SourceInfo,
             max_side: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (key, example) in order, decoding/encoding in a thread pool."""
  def work(i: int):
    record = source[i]
    if int(record["index"]) != i:  # skip_corrupt substituted another element
      return None
    if max_side:
      record = _shrink(record, max_side)
    return encode_record(record, info)

  chunk = 64
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
    for start in range(0, len(source), chunk):
      for i, ex in zip(range(start, len(source)),
                       pool.map(work, range(start, min(start + chunk, len(source))))):
        if ex is not None:
          yield i, ex


def _shrink(record: Record, max_side: int) -> Record:
  h, w = record["image"].shape[:2]
  if max(h, w) <= max_side:
    return record
  hw = (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w))))
  out = {**record, "image": imageio.resize_image(record["image"], hw)}
  if "mask" in record:
    out["mask"] = imageio.resize_mask(record["mask"], hw)
  return out


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: features from a SourceInfo, metadata, ordered examples."""
  VERSION = tfds.core.Version(VERSION)

  # No checksums file to locate. (TFDS's lookup imports the optional
  # `importlib_resources` backport for builders defined inside a package.)
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _source_info(self) -> SourceInfo:
    """Overridden by each builder (an abstract hook; tfds builders cannot use ABCMeta)."""
    raise TypeError(f"{type(self).__name__} must define _source_info()")

  def _info(self) -> tfds.core.DatasetInfo:
    info = self._source_info()
    return tfds.core.DatasetInfo(
        builder=self, description=f"medrep_jax records of {info.name}",
        features=_features(info), disable_shuffling=True,
        metadata=tfds.core.MetadataDict(source_info=dataclasses.asdict(info)))

  def _generate_examples(self, source: Source, max_side: int | None = None):
    yield from _encoded(source, self._source_info(), max_side)


class SourceBuilder(_RecordBuilder, skip_registration=True):
  """Builds a TFDS dataset from `{split: Source}`; see `source_builder`."""

  def __init__(self, *, sources: Mapping[str, Source], **kwargs):
    if not sources:
      raise DataError("SourceBuilder needs at least one {split: Source}")
    self._sources = dict(sources)
    infos = {dataclasses.replace(s.info, name=self.name) for s in self._sources.values()}
    if len(infos) != 1:
      raise DataError(f"all splits must share one SourceInfo, got {infos}")
    self._info_value = infos.pop()
    super().__init__(**kwargs)

  def _source_info(self) -> SourceInfo:
    return self._info_value

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(src) for split, src in self._sources.items()}


def source_builder(name: str, sources: Mapping[str, Source],
                   data_dir: PathLike) -> tfds.core.DatasetBuilder:
  """A `SourceBuilder` named `name` (snake_case), writing array_record under data_dir."""
  cls = types.new_class(name.title().replace("_", ""), (SourceBuilder,),
                        {"skip_registration": True}, lambda ns: ns.update(name=name))
  return cls(sources=sources, data_dir=os.fspath(data_dir), file_format="array_record")


def prepare(builder: tfds.core.DatasetBuilder, *, manual_dir: PathLike | None = None,
            max_examples_per_split: int | None = None,
            overwrite: bool = False) -> pathlib.Path:
  """download_and_prepare as array_record; returns the builder's data folder."""
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir),
      max_examples_per_split=max_examples_per_split, download_mode=mode)
  builder.download_and_prepare(download_config=config, file_format="array_record")
  return pathlib.Path(builder.data_dir)


def build_from_source(sources: Mapping[str, Source], name: str, data_dir: PathLike, *,
                      max_examples_per_split: int | None = None,
                      overwrite: bool = False) -> pathlib.Path:
  """Writes `{split: Source}` once as a TFDS dataset; returns its folder."""
  return prepare(source_builder(name, sources, data_dir),
                 max_examples_per_split=max_examples_per_split, overwrite=overwrite)


def find_builder_dir(name: str, data_dir: PathLike, config: str | None = None) -> pathlib.Path:
  """The newest prepared `<data_dir>/<name>[/<config>]/<version>/` folder."""
  base = pathlib.Path(data_dir) / name
  if config:
    base = base / config
  found = sorted(base.glob("*/dataset_info.json") if config else
                 list(base.glob("*/dataset_info.json")) + list(base.glob("*/*/dataset_info.json")))
  versions = [p.parent for p in found if _is_version(p.parent.name)]
  if not versions:
    raise DataError(f"no prepared TFDS dataset {name!r} (config {config}) under {data_dir}: "
                    "prepare it first (tfds_builders.prepare / build_from_source)")
  configs = {v.parent for v in versions}
  if len(configs) > 1:
    raise DataError(f"{base} holds several configs {sorted(c.name for c in configs)}; "
                    "pass config=")
  return max(versions, key=lambda v: tuple(int(x) for x in v.name.split(".")))


def _is_version(s: str) -> bool:
  parts = s.split(".")
  return len(parts) == 3 and all(p.isdigit() for p in parts)


class TfdsSource(Source):
  """Reads a prepared split with `as_data_source` and decodes to records.

  `name` is a dataset name under `data_dir` or a prepared builder folder.
  The data source opens lazily, once per process (picklable).
  """

  def __init__(self, name: str, split: str = "train", *, data_dir: PathLike | None = None,
               config: str | None = None):
    path = pathlib.Path(name)
    if (path / "dataset_info.json").is_file():
      self.builder_dir = path
    elif data_dir is None:
      raise DataError(f"TfdsSource({name!r}): pass data_dir (the TFDS data folder)")
    else:
      self.builder_dir = find_builder_dir(name, data_dir, config)
    builder = tfds.builder_from_directory(os.fspath(self.builder_dir))
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
      raise DataError(f"{self.builder_dir} has no split {split!r}; splits: {splits}")
    meta = dict(builder.info.metadata or {}).get("source_info")
    if meta is None:
      raise DataError(f"{self.builder_dir} was not written by medrep_jax (no source_info metadata)")
    meta["class_names"] = tuple(meta["class_names"])
    self.info = SourceInfo(**meta)
    self.split = split
    self._len = builder.info.splits[split].num_examples
    self._ds = None

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def _num_elements(self) -> int:
    return self._len

  def _load(self, index: int) -> Record:
    if self._ds is None:
      builder = tfds.builder_from_directory(os.fspath(self.builder_dir))
      self._ds = builder.as_data_source(self.split)
    return decode_example(self._ds[index], self.info)


# ---------------------------------------------------------------------------
# Manual-download builders for the papers' public datasets.


@dataclasses.dataclass(eq=False)
class ManualConfig(tfds.core.BuilderConfig):
  """`max_side`: shrink images (bilinear) and masks (nearest) so H, W <= max_side."""
  max_side: int | None = None


_CONFIGS = [ManualConfig(name="native", description="stored resolution"),
            ManualConfig(name="max512", description="longer side <= 512", max_side=512),
            ManualConfig(name="max256", description="longer side <= 256", max_side=256)]


class _ManualBuilder(_RecordBuilder, skip_registration=True):
  """Reads a manually downloaded folder with the medrep_jax readers."""
  BUILDER_CONFIGS = _CONFIGS
  LAYOUT = ""
  MARKER = ""  # a path that identifies the dataset root inside manual_dir
  MANUAL_DOWNLOAD_INSTRUCTIONS = ""

  def __init__(self, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
               **kwargs):
    self.fractions = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    super().__init__(**kwargs)

  def _readers(self, root: pathlib.Path) -> dict[str, Source]:
    """Overridden by each manual builder: the readers of its splits under `root`."""
    raise TypeError(f"{type(self).__name__} must define _readers()")

  def _source_info(self) -> SourceInfo:
    return self.SOURCE_INFO

  def _split_generators(self, dl_manager):
    try:
      manual = pathlib.Path(dl_manager.manual_dir)
    except AssertionError as e:
      raise DataError(f"{self.name}: manual data missing. {e}") from None
    candidates = [manual] + sorted(p for p in manual.iterdir() if p.is_dir())
    root = next((c for c in candidates if (c / self.MARKER).exists()), None)
    if root is None:
      raise DataError(f"{self.name}: {manual} does not contain {self.MARKER!r}. Expected layout "
                      f"of the manual folder {manual}:\n{self.LAYOUT}")
    try:
      readers = self._readers(root)
    except DataError as e:
      raise DataError(f"{e}\nExpected layout of the manual folder {manual}:\n{self.LAYOUT}") from e
    max_side = self.builder_config.max_side
    return {split: self._generate_examples(src, max_side) for split, src in readers.items()}


def _instructions(layout: str, url: str) -> str:
  return (f"Download the dataset from {url} and extract it into the manual folder "
          f"(default <data_dir>/downloads/manual, or pass manual_dir=) so that it reads:\n{layout}")


class MedrepCovid19Radiography(_ManualBuilder):
  """COVID-19 Radiography Database: 4 classes, lung masks (resized to the image)."""
  name = "medrep_covid19_radiography"
  CLASSES = ("Normal", "COVID", "Lung_Opacity", "Viral Pneumonia")
  MARKER = "COVID/images"
  LAYOUT = ("  <manual_dir>/[COVID-19_Radiography_Dataset/]\n"
            "    COVID/images/*.png            COVID/masks/*.png\n"
            "    Normal/images/*.png           Normal/masks/*.png\n"
            "    Lung_Opacity/images/*.png     Lung_Opacity/masks/*.png\n"
            "    Viral Pneumonia/images/*.png  Viral Pneumonia/masks/*.png")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
      LAYOUT, "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database")
  SOURCE_INFO = SourceInfo(name=name, num_classes=4, class_names=CLASSES, channels=1,
                           has_mask=True, num_mask_classes=2)

  def _readers(self, root):
    return {s: ImageMaskFolder(root, s, classes=self.CLASSES, channels=1, resize_masks=True,
                               **self.fractions) for s in ("train", "val", "test")}


class MedrepIsic2018(_ManualBuilder):
  """ISIC 2018 Task 1 lesion segmentation; Validation/Test folders used if present."""
  name = "medrep_isic2018"
  MARKER = "ISIC2018_Task1-2_Training_Input"
  LAYOUT = ("  <manual_dir>/\n"
            "    ISIC2018_Task1-2_Training_Input/*.jpg\n"
            "    ISIC2018_Task1_Training_GroundTruth/*_segmentation.png\n"
            "    ISIC2018_Task1-2_Validation_Input/*.jpg   (optional; else carved from train)\n"
            "    ISIC2018_Task1_Validation_GroundTruth/*_segmentation.png\n"
            "    ISIC2018_Task1-2_Test_Input/*.jpg         (optional; else carved from train)\n"
            "    ISIC2018_Task1_Test_GroundTruth/*_segmentation.png")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(LAYOUT, "https://challenge.isic-archive.com/data/")
  SOURCE_INFO = SourceInfo(name=name, num_classes=0, class_names=(), channels=3,
                           has_mask=True, num_mask_classes=2)

  def _readers(self, root):
    dirs = {s: (f"ISIC2018_Task1-2_{s}_Input", f"ISIC2018_Task1_{s}_GroundTruth")
            for s in ("Training", "Validation", "Test")}
    own = {"val": "Validation", "test": "Test"}
    own = {k: v for k, v in own.items() if (root / dirs[v][0]).is_dir()}
    fr = dict(self.fractions)
    fr["val_fraction"] = 0.0 if "val" in own else fr["val_fraction"]
    fr["test_fraction"] = 0.0 if "test" in own else fr["test_fraction"]
    common = dict(mask_suffix="_segmentation", channels=3)
    out = {}
    for split in ("train", "val", "test"):
      if split in own:
        img, msk = dirs[own[split]]
        out[split] = ImageMaskFolder(root, "all", image_dir=img, mask_dir=msk, **common)
      else:
        img, msk = dirs["Training"]
        out[split] = ImageMaskFolder(root, split, image_dir=img, mask_dir=msk, **common, **fr)
    return out


class MedrepKvasirSeg(_ManualBuilder):
  """Kvasir-SEG polyp segmentation (JPEG masks thresholded at 127)."""
  name = "medrep_kvasir_seg"
  MARKER = "images"
  LAYOUT = ("  <manual_dir>/[Kvasir-SEG/]\n"
            "    images/*.jpg\n"
            "    masks/*.jpg   (same file names as the images)")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(LAYOUT, "https://datasets.simula.no/kvasir-seg/")
  SOURCE_INFO = SourceInfo(name=name, num_classes=0, class_names=(), channels=3,
                           has_mask=True, num_mask_classes=2)

  def _readers(self, root):
    return {s: ImageMaskFolder(root, s, mask_threshold=127, channels=3, **self.fractions)
            for s in ("train", "val", "test")}


MANUAL_BUILDERS = {b.name: b for b in (MedrepCovid19Radiography, MedrepIsic2018, MedrepKvasirSeg)}


def prepare_manual(name: str, data_dir: PathLike, *, manual_dir: PathLike | None = None,
                   config: str = "native", max_examples_per_split: int | None = None,
                   overwrite: bool = False, **fractions: Any) -> pathlib.Path:
  """Prepares one of `MANUAL_BUILDERS` from its manual folder; returns its data folder."""
  if name not in MANUAL_BUILDERS:
    raise DataError(f"unknown manual builder {name!r}; known: {sorted(MANUAL_BUILDERS)}")
  builder = MANUAL_BUILDERS[name](data_dir=os.fspath(data_dir), config=config,
                                  file_format="array_record", **fractions)
  return prepare(builder, manual_dir=manual_dir, max_examples_per_split=max_examples_per_split,
                 overwrite=overwrite)
