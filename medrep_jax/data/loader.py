"""grain loaders: deterministic, resumable, sharded per process.

The train stream is `source -> shuffle (reshuffled every epoch) -> repeat -> transforms`,
a random-access `grain.MapDataset`, so element `i` of the stream is a pure function of
(seed, i). Each global batch of B elements is split into contiguous blocks of B / P rows,
one per process, so P processes together see exactly the batch one process would see.
The iterator state (`next_index`) is saved in checkpoints, and a resumed run continues
with the very next batch.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np

from medrep_jax.data import subsets
from medrep_jax.data.sources import DataError


class _ProcessBlock(grain.MapDataset):
  """Rows [p*b, (p+1)*b) of every global batch of size B = b * process_count."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by "
                       f"{process_count} processes")
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return (len(self._parent) // self._global) * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + row]

  def __str__(self) -> str:
    return f"_ProcessBlock(global={self._global}, local={self._local}, offset={self._offset})"


def _hint(key: str, shapes: list[tuple[int, ...]]) -> str:
  if key == "masks":
    return ("data.mask_combine='stack' keeps every mask of an image, and these images have "
            "different numbers of masks; choose masks by name (data.mask_choose) or combine "
            "them (data.mask_combine='union'|'majority'|'first')")
  if key in ("image", "mask", "roi") and any(len(s) >= 3 + (key == "image") for s in shapes):
    return ("whole volumes (data.volume='whole') of different depths batch only with a batch "
            "size of 1 (train.batch_size, train.eval_batch_size); or read slices "
            "(data.volume='slices')")
  return "add a transform that gives every element the same shape (data.image_size)"


def stack_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Stacks records into a batch; a DataError names the field whose shapes differ."""
  first = records[0]
  if not isinstance(first, dict):
    return jax.tree.map(lambda *xs: np.stack(xs), *records)
  keys = set(first)
  for rec in records[1:]:
    if set(rec) != keys:
      raise DataError(f"elements {first.get('index', '?')} and {rec.get('index', '?')} have "
                      f"different fields {sorted(keys)} and {sorted(rec)}; every element of "
                      "a dataset needs the same fields (a mask, data.roi_mask, a label)")
  for key in first:
    shapes = [np.shape(r[key]) for r in records]
    if len(set(shapes)) > 1:
      raise DataError(f"cannot batch field {key!r}: its shapes differ within a batch "
                      f"({sorted(set(shapes))[:4]}); {_hint(key, shapes)}")
  return jax.tree.map(lambda *xs: np.stack(xs), *records)


def _apply(ds: grain.MapDataset, transforms: Sequence[Any], seed: int) -> grain.MapDataset:
  for t in transforms:
    if isinstance(t, grain.transforms.RandomMap):
      ds = ds.random_map(t, seed=seed)
    else:
      ds = ds.map(t)
  return ds


def train_dataset(source, transforms: Sequence[Any], *, global_batch: int, seed: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """The batched, per-process train stream (infinite)."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if len(source) < global_batch:
    raise ValueError(f"the train split has {len(source)} examples, fewer than the global "
                     f"batch size {global_batch}; lower train.batch_size")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = _apply(ds, transforms, seed)
  ds = _ProcessBlock(ds, global_batch, pi, pc)
  return ds.batch(global_batch // pc, drop_remainder=True, batch_fn=stack_records)


def iterate(ds: grain.MapDataset, *, num_threads: int = 4, prefetch: int = 64,
            state: dict | None = None):
  """A grain iterator over `ds` (threads decode ahead), restored from `state` if given."""
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch)))
  if state:
    it.set_state(state)
  return it


class _Padded:
  """Random access over `source` padded to `length` with copies of element 0."""

  def __init__(self, source, length: int):
    self._source = source
    self._n = len(source)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int):
    valid = i < self._n
    rec = dict(self._source[i if valid else 0])
    rec["_valid"] = np.float32(valid)
    return rec


def collect(source, transforms: Sequence[Any], *, limit: int = 0,
            batch_size: int = 64) -> dict[str, np.ndarray]:
  """All (or a fixed spread subset of `limit`) transformed records of `source` as arrays, on this
  process (for host-side evaluation: FD references, filters)."""
  batches = list(eval_batches(source, transforms, global_batch=batch_size, max_examples=limit,
                              process_index=0, process_count=1))
  valid = np.concatenate([b.pop("_valid") for b in batches]) > 0
  return {k: np.concatenate([b[k] for b in batches])[valid] for k in batches[0]}


def eval_batches(source, transforms: Sequence[Any], *, global_batch: int,
                 max_examples: int = 0, num_threads: int = 4,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `source` in fixed-size batches; padding rows have `_valid == 0`.

  With `0 < max_examples < len(source)`, the pass covers a fixed random subset of that
  size (`subsets.spread_subset`), not the first rows, which may all be one class.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n = len(source) if not max_examples else min(len(source), int(max_examples))
  if n == 0:
    raise ValueError("the evaluation split is empty")
  num_batches = math.ceil(n / global_batch)
  base = grain.MapDataset.source(
      subsets.spread_subset(source, n) if n < len(source) else source)
  ds = grain.MapDataset.source(_Padded(base, num_batches * global_batch))
  ds = _apply(ds, transforms, seed=0)
  ds = _ProcessBlock(ds, global_batch, pi, pc).batch(global_batch // pc,
                                                     batch_fn=stack_records)
  yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                  prefetch_buffer_size=2 * global_batch))
