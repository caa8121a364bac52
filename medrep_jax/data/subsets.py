"""Deterministic subsets of a source (label fractions for fine-tuning, Table 8 style)."""
from __future__ import annotations

import numpy as np


class Subset:
  """Random access over `source[indices[i]]`; keeps `info` and re-indexes `"index"`."""

  def __init__(self, source, indices):
    self._source = source
    self.indices = np.asarray(indices, dtype=np.int64)
    self.info = source.info

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self._source[int(self.indices[i])]


def spread_subset(source, n: int) -> Subset:
  """`n` examples of `source` drawn without replacement by a fixed seed, in index order.

  Used for capped evaluation and probe reference sets (`max_eval_examples`,
  `monitor.max_train`): datasets are often stored sorted by class (the MedMNIST `.npz`
  files are), so the first `n` rows can all be one class.
  """
  idx = np.sort(np.random.default_rng(0).choice(len(source), size=int(n), replace=False))
  return Subset(source, idx)


def label_fraction(source, fraction: float, seed: int, labels=None) -> Subset:
  """Keeps `fraction` of each class (at least one example per class), chosen by `seed`.

  Args:
    source: a Source with single-label records (or multi-label: stratifies on the
      first positive class).
    fraction: in (0, 1].
    seed: the subset is a function of (seed, fraction) only.
    labels: optional precomputed label array (avoids decoding every image).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
  n = len(source)
  if fraction == 1.0:
    return Subset(source, np.arange(n))
  if labels is None:
    labels = getattr(source, "labels", None)
  if labels is None:
    labels = np.asarray([np.argmax(np.atleast_1d(source[i]["label"])) for i in range(n)])
  labels = np.asarray(labels)
  if labels.ndim > 1:
    labels = labels.argmax(-1)
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    k = max(1, int(round(fraction * len(idx))))
    keep.append(rng.choice(idx, size=k, replace=False))
  return Subset(source, np.sort(np.concatenate(keep)))
