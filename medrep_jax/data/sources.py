"""The `Source` protocol: random-access datasets of numpy records.

A record is a dict of numpy values:
  "image": (H, W, C) uint8 (photographs, radiographs) or float32 (CT in HU).
  "label": np.int32 class id, or a float32 multi-hot vector for multi-label data.
  "mask":  optional (H, W) uint8 class ids (0 = background).
  "masks": optional (K, H, W) uint8: every mask of the image (data.mask_combine="stack").
  "roi":   optional (H, W) uint8 0/1 region (field-of-view) mask (data.roi_mask).
  "index": np.int64 index of the element within the source.

Sources decode lazily in `__getitem__`, so grain workers parallelize decoding,
and they are picklable (grain may use worker processes). Any `Source` works
with `grain.MapDataset.source(src)`.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

Record = dict[str, Any]
SPLITS = ("train", "val", "test")


class DataError(ValueError):
  """Bad input data: the message names the file, key or shapes involved."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """Static description of a `Source`.

  Attributes:
    name: human-readable dataset name.
    num_classes: number of label classes (0 if the source has no labels).
    class_names: one name per class.
    channels: C of the "image" arrays.
    has_mask: whether records carry a "mask".
    num_mask_classes: number of mask ids including background (2 = binary).
    multi_label: labels are float32 multi-hot vectors of size `num_classes`.
    image_dtype: "uint8" or "float32".
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  channels: int
  has_mask: bool = False
  num_mask_classes: int = 0
  multi_label: bool = False
  image_dtype: str = "uint8"


class Source(abc.ABC):
  """Random-access dataset of records (grain `RandomAccessDataSource`).

  Subclasses implement `_num_elements()` and `_load(i)`. Setting
  `skip_corrupt=True` makes a `DataError` from `_load` substitute the next
  readable element (deterministically, wrapping around), log one warning per
  bad element and count it in `num_skipped` (per process).
  """

  info: SourceInfo
  skip_corrupt: bool = False
  num_skipped_at_init: int = 0  # bad elements dropped while listing files
  skipped: Sequence[tuple[str, str]] = ()  # (path, reason) of files left out when listing
  groups: Sequence[str] | None = None      # the group of each element, where known

  @abc.abstractmethod
  def _num_elements(self) -> int:
    """Number of elements."""

  @abc.abstractmethod
  def _load(self, index: int) -> Record:
    """Decodes element `index` (0 <= index < len); raises DataError if bad."""

  def __len__(self) -> int:
    return self._num_elements()

  def __getitem__(self, index: int) -> Record:
    n = len(self)
    i = int(index)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"{self.info.name}: index {index} out of range for a source of length {n}")
    if not self.skip_corrupt:
      return self._with_index(self._load(i), i)
    for step in range(n):
      j = (i + step) % n
      if j in self._bad():
        continue
      try:
        return self._with_index(self._load(j), j)
      except DataError as e:
        self._bad().add(j)
        logging.warning("skip_corrupt: skipping element %d of %s: %s", j, self.info.name, e)
    raise DataError(f"{self.info.name}: all {n} elements are unreadable; check the files")

  @property
  def num_skipped(self) -> int:
    """Number of unreadable elements skipped so far (in this process)."""
    return len(self._bad()) + self.num_skipped_at_init

  def _bad(self) -> set[int]:
    return self.__dict__.setdefault("_bad_set", set())

  @staticmethod
  def _with_index(record: Record, i: int) -> Record:
    record["index"] = np.int64(i)
    return record

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.info.name!r}, len={len(self)})"


def window_of(data_cfg: Any) -> tuple[float, float] | None:
  """(level, width) of the HU window in a data config, or None for no window.

  Reads `window_level` and `window_width`; a missing level or a width of 0
  means no window. Used by the DICOM reader and as the `Normalize` value range.
  """
  level, width = data_cfg.get("window_level", None), data_cfg.get("window_width", None)
  if level is None or not width:
    return None
  return float(level), float(width)


def check_split(split: str, allow_all: bool = True) -> None:
  """Raises DataError unless `split` is a known split name."""
  allowed = SPLITS + (("all",) if allow_all else ())
  if split not in allowed:
    raise DataError(f"unknown split {split!r}; expected one of {allowed}")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
  """Raises DataError unless the carve-out fractions leave a train split."""
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise DataError(
        f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
        "and sum to less than 1")
