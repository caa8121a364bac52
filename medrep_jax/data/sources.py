"""The `Source` protocol: random-access datasets of numpy records.

A record is a dict of numpy values:
  "image": (H, W, C) uint8 (photographs, radiographs) or float32 (CT in HU).
  "label": np.int32 class id, or a float32 multi-hot vector for multi-label data.
  "mask":  optional (H, W) uint8 class ids (0 = background).
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


def carve_split(groups: Sequence[Any], split: str, *, val_fraction: float,
                test_fraction: float, seed: int) -> np.ndarray:
  """Deterministically carves val/test out of one list of elements.

  Elements sharing a group (a class id for stratification, or a patient id
  with `by_group`) are permuted with a generator seeded by (seed, group
  number); per group the first round(n * test_fraction) go to test, the next
  round(n * val_fraction) to val, and the rest to train.

  Args:
    groups: one hashable stratum per element (e.g. its class id).
    split: "train", "val", "test" or "all".
    val_fraction: fraction of each stratum carved out for val.
    test_fraction: fraction of each stratum carved out for test.
    seed: permutation seed.

  Returns:
    Sorted element indices of `split`.
  """
  check_split(split)
  check_fractions(val_fraction, test_fraction)
  groups = list(groups)
  if split == "all":
    return np.arange(len(groups), dtype=np.int64)
  keys = sorted(set(groups), key=str)
  pos = {k: j for j, k in enumerate(keys)}
  ids = np.array([pos[g] for g in groups], dtype=np.int64)
  out = [np.zeros((0,), np.int64)]
  for g_id in range(len(keys)):
    members = np.flatnonzero(ids == g_id)
    perm = members[np.random.default_rng((seed, g_id)).permutation(len(members))]
    n_test = int(round(len(members) * test_fraction))
    n_val = int(round(len(members) * val_fraction))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
             "train": perm[n_test + n_val:]}
    out.append(parts[split])
  return np.sort(np.concatenate(out))

def carve_by_group(groups: Sequence[Any], split: str, *, val_fraction: float,
                   test_fraction: float, seed: int) -> np.ndarray:
  """Like `carve_split`, but whole groups (e.g. patients) go to one split."""
  check_split(split)
  groups = list(groups)
  unique = sorted(set(groups), key=str)
  # A single stratum: permute the groups themselves, then expand to elements.
  chosen = carve_split([0] * len(unique), split, val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed)
  keep = {unique[k] for k in chosen}
  return np.array([i for i, g in enumerate(groups) if g in keep], dtype=np.int64)
