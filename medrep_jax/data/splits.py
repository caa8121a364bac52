"""Groups, split carving and k-fold splits that keep each group (patient, eye, video) whole.

- `group_of(path, group_by)`: the group id of a file from a regex on its path relative to
  the data root (with '/' separators): the first capture group, or the whole match.
- `carve(ids, split, groups=..., strata=...)`: the one deterministic train/val/test carve.
  Without groups it is the split rule of earlier releases (stratified by `strata`, e.g.
  class ids), so existing runs keep their splits; with groups, whole groups are carved,
  stratified by each group's most common stratum.
- `kfold(ids, groups=..., k, fold, seed)`: k folds of whole groups, balanced by item
  count; every item is in exactly one validation fold.

- `read_split_file(path)`, `read_label_csv(path, ...)`, `LabelTable`, `IdIndex`: split
  files and label tables, defined in `tables.py` and re-exported here.
"""
from __future__ import annotations

import collections
import functools
import re
from typing import Any, Sequence

import numpy as np

from medrep_jax.data.sources import DataError, check_fractions, check_split
from medrep_jax.data.tables import (IdIndex, LabelTable, normalize_id,  # noqa: F401  (re-exported)
                                    normalize_split, read_label_csv, read_split_file)

UNMATCHED = ("error", "own")


@functools.lru_cache(maxsize=64)
def _compile(group_by: str) -> re.Pattern:
  try:
    return re.compile(group_by)
  except re.error as e:
    raise DataError(f"data.group_by = {group_by!r} is not a valid regular expression: "
                    f"{e}") from e


def group_of(path: str, group_by: str, *, unmatched: str = "error") -> str:
  """The group id of `path` under the regex `group_by`.

  The regex is searched (not anchored) in `path`, taken relative to the data root with
  '/' separators (backslashes are turned into '/'). The group id is the first capture
  group when the regex has one and it took part in the match, else the whole match.
  Examples: `r"^([^/]+)/"` groups by top folder (patient), `r"(p\\d+)_"` by a file-name
  token, `r"(.*)_(?:left|right)"` puts both eyes of a person together.

  Args:
    path: the file's path relative to the data root.
    group_by: the regex (data.group_by).
    unmatched: "error" (default: a file without a group would silently become its own
      group and could leak across splits) raises; "own" makes the path its own group.

  Raises:
    DataError: naming the path and the regex when nothing matches (with "error"), or
      when the regex is invalid.
  """
  if unmatched not in UNMATCHED:
    raise DataError(f"unmatched must be one of {UNMATCHED}, got {unmatched!r}")
  path = str(path).replace("\\", "/")
  found = _compile(group_by).search(path)
  if found is None:
    if unmatched == "own":
      return path
    raise DataError(f"path {path!r} does not match data.group_by = {group_by!r}, so its "
                    "group (patient, eye, video) is unknown. Fix the regex (it is searched "
                    "in the path relative to the data root, with '/' separators), or move "
                    "the file")
  if found.re.groups and found.group(1) is not None:
    return found.group(1)
  return found.group(0)


def _permuted_carve(strata: Sequence[Any], split: str, val_fraction: float,
                    test_fraction: float, seed: int) -> np.ndarray:
  """Per stratum (sorted by str), a seeded permutation: test first, then val, then train."""
  keys = sorted(set(strata), key=str)
  pos = {k: j for j, k in enumerate(keys)}
  ids = np.array([pos[s] for s in strata], dtype=np.int64)
  out = [np.zeros((0,), np.int64)]
  for s_id in range(len(keys)):
    members = np.flatnonzero(ids == s_id)
    perm = members[np.random.default_rng((seed, s_id)).permutation(len(members))]
    n_test = int(round(len(members) * test_fraction))
    n_val = int(round(len(members) * val_fraction))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
             "train": perm[n_test + n_val:]}
    out.append(parts[split])
  return np.sort(np.concatenate(out))


def _check_lengths(ids: Sequence[str], **named: Sequence[Any] | None) -> None:
  for name, values in named.items():
    if values is not None and len(values) != len(ids):
      raise DataError(f"{name} has {len(values)} entries for {len(ids)} ids; give one per "
                      "element")


def _group_strata(groups: list[Any], unique: list[Any],
                  strata: Sequence[Any] | None) -> list[Any]:
  """Each group's most common stratum (ties: the smallest by str); one stratum if None."""
  if strata is None:
    return [0] * len(unique)
  counts: dict[Any, collections.Counter] = {g: collections.Counter() for g in unique}
  for g, s in zip(groups, strata):
    counts[g][s] += 1
  return [min(c.items(), key=lambda kv: (-kv[1], str(kv[0])))[0]
          for c in (counts[g] for g in unique)]


def carve(ids: Sequence[str], split: str, *, groups: Sequence[Any] | None = None,
          strata: Sequence[Any] | None = None, val_fraction: float, test_fraction: float,
          seed: int) -> list[int]:
  """Deterministically carves val/test out of one list of elements.

  Without `groups`, the elements of each stratum (default: one stratum) are permuted
  with a generator seeded by (seed, stratum number, strata sorted by str); the first
  round(n * test_fraction) go to test, the next round(n * val_fraction) to val and the
  rest to train. This is the earlier stratified rule element for element.

  With `groups`, the same carve runs over the sorted unique groups (each group's stratum
  being its members' most common one) and every element follows its group, so no group
  is in two splits. With `strata=None` this is the earlier group rule.

  Args:
    ids: one id per element (e.g. relative paths) in a deterministic (sorted) order:
      the carve depends on the order, not on the id text.
    split: "train", "val", "test" or "all" (every element).
    groups: one group id per element (see `group_of`), or None.
    strata: one stratum per element (e.g. class id) to balance splits by, or None.
    val_fraction, test_fraction: the fractions (of each stratum) carved out.
    seed: the permutation seed (data.seed).

  Returns:
    Sorted element indices of `split`.
  """
  check_split(split)
  check_fractions(val_fraction, test_fraction)
  _check_lengths(ids, groups=groups, strata=strata)
  if split == "all":
    return list(range(len(ids)))
  if groups is None:
    chosen = _permuted_carve(list(strata) if strata is not None else [0] * len(ids), split,
                             val_fraction, test_fraction, seed)
    return [int(i) for i in chosen]
  groups = list(groups)
  unique = sorted(set(groups), key=str)
  chosen = _permuted_carve(_group_strata(groups, unique, strata), split, val_fraction,
                           test_fraction, seed)
  keep = {unique[k] for k in chosen}
  return [i for i, g in enumerate(groups) if g in keep]


def kfold(ids: Sequence[str], *, groups: Sequence[Any] | None = None, k: int, fold: int,
          seed: int) -> tuple[list[int], list[int]]:
  """Fold `fold` of a k-fold split by group: (train indices, val indices), both sorted.

  The unique groups (each element its own group when `groups` is None) are shuffled
  with `seed`, ordered by size (largest first, the shuffle breaking ties) and each is
  given to the fold with the fewest elements so far. The assignment does not depend on
  `fold`, so the k val folds partition the elements: every element is in exactly one
  val fold, and no group is split.

  Raises:
    DataError: for k < 2, a fold outside [0, k), or fewer groups than folds.
  """
  _check_lengths(ids, groups=groups)
  if int(k) < 2:
    raise DataError(f"k-fold needs k >= 2 folds, got k={k} (data.num_folds)")
  if not 0 <= int(fold) < int(k):
    raise DataError(f"fold {fold} is outside [0, {k}) (data.fold)")
  groups = list(groups) if groups is not None else list(range(len(ids)))
  unique = sorted(set(groups), key=str)
  if len(unique) < k:
    raise DataError(f"k-fold with k={k} needs at least {k} groups; the data has "
                    f"{len(unique)} ({unique[:5]}{'...' if len(unique) > 5 else ''})")
  sizes = collections.Counter(groups)
  order = [unique[j] for j in np.random.default_rng(seed).permutation(len(unique))]
  order.sort(key=lambda g: -sizes[g])  # stable: the shuffle breaks ties
  load = [0] * int(k)
  fold_of = {}
  for g in order:
    f = int(np.argmin(load))
    fold_of[g] = f
    load[f] += sizes[g]
  val = [i for i, g in enumerate(groups) if fold_of[g] == fold]
  train = [i for i, g in enumerate(groups) if fold_of[g] != fold]
  return train, val
