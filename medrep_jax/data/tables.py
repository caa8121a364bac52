"""Split files and label tables written by a dataset's authors, and matching their ids to files.

- `read_split_file(path)`: a split given by the dataset's authors (CSV, JSON or text):
  id -> "train" | "val" | "test".
- `read_label_csv(path, id_column=..., label_columns=...)`: single- or multi-label tables.
- `IdIndex`: the rule that matches a table's ids to files: the path relative to the data
  root, that path without its suffix, the file name, or the file stem, in this order.

Re-exported by `splits.py`, the public home of these names.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Sequence

import numpy as np

from medrep_jax.data.formats import stem_of
from medrep_jax.data.sources import DataError


SPLIT_NAMES = {"train": "train", "training": "train", "tr": "train",
               "val": "val", "valid": "val", "validation": "val", "dev": "val",
               "test": "test", "testing": "test", "ts": "test"}


def normalize_split(name: str, *, where: str = "") -> str:
  """"train"/"training" -> train, "val"/"valid"/"validation"/"dev" -> val,
  "test"/"testing" -> test (case-insensitive); else a DataError naming `where`."""
  key = str(name).strip().lower()
  if key not in SPLIT_NAMES:
    at = f" in {where}" if where else ""
    raise DataError(f"unknown split name {name!r}{at}; accepted: {sorted(SPLIT_NAMES)}")
  return SPLIT_NAMES[key]


def normalize_id(text: str) -> str:
  """An id or relative path as written in a table: stripped, '/' separators, no './'."""
  text = str(text).strip().replace("\\", "/")
  while text.startswith("./"):
    text = text[2:]
  return text


class IdIndex:
  """Finds the table id of a file. Rule, first match wins: the file's path relative to
  the data root ('/' separators), that path without its suffix, the file name, the file
  stem (`.nii.gz` is one suffix). Several files may match one id (same name in two
  folders): each gets that id's row."""

  def __init__(self, ids: Sequence[str]):
    self.ids = set(normalize_id(i) for i in ids)

  def find(self, rel_path: str) -> str | None:
    """The id that names `rel_path`, or None."""
    rel = normalize_id(rel_path)
    name = rel.rsplit("/", 1)[-1]
    stem = stem_of(name)
    no_suffix = rel[:len(rel) - (len(name) - len(stem))]
    for candidate in (rel, no_suffix, name, stem):
      if candidate in self.ids:
        return candidate
    return None


# ---------------------------------------------------------------- tables

_ID_COLUMNS = ("id", "path", "file", "filename", "file_name", "image", "image_id",
               "image_path", "name", "case", "case_id")
_SPLIT_COLUMNS = ("split", "fold", "set", "subset", "partition")


def read_csv(path: pathlib.Path, *, with_lines: bool = False):
  """Header and rows of a CSV/TSV (delimiter sniffed among , ; tab); stripped cells.

  Rows are {column: cell} dicts, or (line number, dict) pairs with `with_lines`; blank
  rows are skipped. Raises DataError naming the file (and line) when it cannot be read,
  is empty or a row's cell count differs from the header's."""
  try:
    text = path.read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read the table {path}: {e}") from e
  lines = text.splitlines()
  if not lines or not lines[0].strip():
    raise DataError(f"the table {path} is empty; it needs a header row of column names")
  if path.suffix.lower() == ".tsv":
    delimiter = "\t"
  else:
    try:
      delimiter = csv.Sniffer().sniff(lines[0], delimiters=",;\t").delimiter
    except csv.Error:
      delimiter = ","
  reader = csv.reader(lines, delimiter=delimiter)
  header = [h.strip() for h in next(reader)]
  rows = []
  for n, row in enumerate(reader, start=2):
    if not any(c.strip() for c in row):
      continue
    if len(row) != len(header):
      raise DataError(f"{path} line {n} has {len(row)} cells but the header has "
                      f"{len(header)} columns {header}")
    cells = {h: c.strip() for h, c in zip(header, row)}
    rows.append((n, cells) if with_lines else cells)
  return header, rows


def _column(path: pathlib.Path, header: list[str], given: str | None,
            candidates: Sequence[str], what: str, field: str) -> str:
  if given:
    if given not in header:
      raise DataError(f"{path} has no column {given!r} ({field}); columns present: {header}")
    return given
  lower = {h.lower(): h for h in header}
  found = next((lower[c] for c in candidates if c in lower), None)
  if found is None:
    raise DataError(f"{path}: no {what} column found among {header}; name it with {field}")
  return found


def _add(out: dict[str, str], key: str, split: str, path: pathlib.Path) -> None:
  key = normalize_id(key)
  if out.get(key, split) != split:
    raise DataError(f"{path}: id {key!r} is listed in two splits ({out[key]} and {split})")
  out[key] = split


def read_split_file(path: str | os.PathLike, *, id_column: str | None = None,
                    split_column: str | None = None) -> dict[str, str]:
  """Reads a split given by the dataset's authors: id -> "train" | "val" | "test".

  Accepted forms (split names normalized by `normalize_split`):
    - CSV/TSV with an id column (`id_column`, else the first of id, path, file,
      filename, image, image_id, name, case ...) and a split column (`split_column`,
      else split, fold, set, subset or partition);
    - JSON: {"train": [ids], "val": [ids], ...} or {id: split};
    - a text file named after its split (`train.txt`, one id per line), or a folder of
      such files.
  Ids are matched to files with `IdIndex`.

  Raises:
    DataError: naming the file for a missing column (listing those present), an unknown
      split name, an id in two splits, or an unreadable file.
  """
  path = pathlib.Path(path)
  out: dict[str, str] = {}
  if path.is_dir():
    texts = sorted(p for p in path.glob("*.txt") if p.stem.lower() in SPLIT_NAMES)
    if not texts:
      raise DataError(f"the split folder {path} has no train.txt/val.txt/test.txt files")
    for p in texts:
      for k, v in read_split_file(p).items():
        _add(out, k, v, p)
    return out
  suffix = path.suffix.lower()
  if suffix == ".json":
    try:
      data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read the split file {path} as JSON: {e}") from e
    if not isinstance(data, dict):
      raise DataError(f"{path}: a JSON split file is {{split: [ids]}} or {{id: split}}, "
                      f"got a {type(data).__name__}")
    for key, value in data.items():
      if isinstance(value, list):
        split = normalize_split(key, where=str(path))
        for item in value:
          _add(out, str(item), split, path)
      else:
        _add(out, str(key), normalize_split(str(value), where=str(path)), path)
    return out
  if suffix == ".txt":
    split = normalize_split(path.stem, where=f"the file name {path}")
    try:
      lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
      raise DataError(f"cannot read the split file {path}: {e}") from e
    for line in lines:
      if line.strip() and not line.lstrip().startswith("#"):
        _add(out, line, split, path)
    return out
  header, rows = read_csv(path)
  id_col = _column(path, header, id_column, _ID_COLUMNS, "id/path", "data.split_id_column")
  split_col = _column(path, header, split_column, _SPLIT_COLUMNS, "split",
                      "data.split_column")
  for row in rows:
    _add(out, row[id_col], normalize_split(row[split_col], where=str(path)), path)
  return out


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """Labels read from a table.

  Attributes:
    path: the table file.
    ids: one normalized id per row.
    labels: (N,) int32 class ids (single-label) or (N, K) float32 multi-hot vectors.
    class_names: one name per class.
    multi_label: whether `labels` are multi-hot.
  """
  path: str
  ids: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  multi_label: bool

  @functools.cached_property
  def _rows(self) -> dict[str, int]:
    return {i: n for n, i in enumerate(self.ids)}

  @functools.cached_property
  def _index(self) -> IdIndex:
    return IdIndex(self.ids)

  def lookup(self, rel_path: str) -> np.ndarray | None:
    """The label of the file at `rel_path` (relative to the data root), or None."""
    key = self._index.find(rel_path)
    return None if key is None else self.labels[self._rows[key]]

  def match(self, rel_paths: Sequence[str]) -> tuple[list[int], np.ndarray, list[str]]:
    """Labels for a list of files.

    Returns:
      (kept, labels, unused): indices into `rel_paths` of the files the table labels,
      their labels (stacked), and the table ids that matched no file.
    """
    kept, rows, used = [], [], set()
    for n, rel in enumerate(rel_paths):
      key = self._index.find(rel)
      if key is not None:
        kept.append(n)
        rows.append(self._rows[key])
        used.add(key)
    labels = self.labels[np.asarray(rows, np.int64)]
    return kept, labels, [i for i in self.ids if i not in used]


def _is_int(text: str) -> bool:
  return bool(re.fullmatch(r"[+-]?\d+(\.0*)?", text))


_BINARY = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}


def read_label_csv(path: str | os.PathLike, *, id_column: str,
                   label_columns: Sequence[str] | None = None,
                   class_names: Sequence[str] | None = None) -> LabelTable:
  """Reads labels from a CSV/TSV table (one row per file).

  Single-label: one label column of class names or integers. Names give class ids in
  the order of `class_names` (default: the sorted names). Integers >= 0 are the class
  ids themselves (class names "0", "1", ... up to the largest, unless given).
  Multi-label: several columns of 0/1 (also true/false), giving float32 multi-hot
  vectors; the class names are the column names.

  Args:
    path: the table (delimiter sniffed among , ; tab).
    id_column: the column naming the file (matched by `IdIndex`: relative path, path
      without suffix, file name or stem).
    label_columns: the label columns; None means every other column (one column:
      single-label; several, all 0/1: multi-label).
    class_names: the class order for single-label names (and their names for integers).

  Raises:
    DataError: naming the file and column for an unknown column (listing the columns
      present), a duplicate or empty id, an empty or non-0/1 multi-label cell, or a
      label not in `class_names`.
  """
  path = pathlib.Path(path)
  header, rows = read_csv(path)
  if id_column not in header:
    raise DataError(f"{path} has no id column {id_column!r} (data.label_id_column); "
                    f"columns present: {header}")
  columns = list(label_columns) if label_columns else [h for h in header if h != id_column]
  missing = [c for c in columns if c not in header]
  if missing or not columns:
    raise DataError(f"{path} has no label column(s) {missing or '(none left)'} "
                    f"(data.label_columns); columns present: {header}")
  if not rows:
    raise DataError(f"the label table {path} has a header but no rows")
  ids, seen = [], {}
  for n, row in enumerate(rows, start=2):
    key = normalize_id(row[id_column])
    if not key:
      raise DataError(f"{path} row {n}: the id column {id_column!r} is empty")
    if key in seen:
      raise DataError(f"{path}: id {key!r} appears twice (rows {seen[key]} and {n})")
    seen[key] = n
    ids.append(key)
  if len(columns) == 1:
    labels, names = _single_label(path, [r[columns[0]] for r in rows], columns[0], class_names)
    return LabelTable(str(path), tuple(ids), labels, names, False)
  labels = np.zeros((len(rows), len(columns)), np.float32)
  for n, row in enumerate(rows):
    for j, c in enumerate(columns):
      value = _BINARY.get(row[c].lower())
      if value is None:
        raise DataError(f"{path} row {n + 2}, column {c!r}: {row[c]!r} is not 0 or 1. "
                        f"Multi-label columns hold 0/1; for a single label column set "
                        f"data.label_columns to it (columns present: {header})")
      labels[n, j] = value
  return LabelTable(str(path), tuple(ids), labels, tuple(columns), True)


def _single_label(path: pathlib.Path, values: list[str], column: str,
                  class_names: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...]]:
  empty = [n + 2 for n, v in enumerate(values) if not v]
  if empty:
    raise DataError(f"{path}: column {column!r} is empty in row(s) {empty[:5]}")
  if all(_is_int(v) for v in values) and all(int(float(v)) >= 0 for v in values):
    ids = np.array([int(float(v)) for v in values], np.int32)
    names = tuple(class_names) if class_names else tuple(str(i) for i in range(ids.max() + 1))
    if ids.max() >= len(names):
      raise DataError(f"{path}: column {column!r} has class id {int(ids.max())} but "
                      f"data.class_names has {len(names)} names")
    return ids, names
  names = tuple(class_names) if class_names else tuple(sorted(set(values)))
  pos = {name: k for k, name in enumerate(names)}
  unknown = sorted(set(values) - set(pos))
  if unknown:
    raise DataError(f"{path}: column {column!r} has labels {unknown[:5]} not in "
                    f"data.class_names {list(names)}")
  return np.array([pos[v] for v in values], np.int32), names
