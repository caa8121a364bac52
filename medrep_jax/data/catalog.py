"""Which files make which split: images, their masks, labels and groups (no decoding).

`build_catalog(root, split, spec)` lists the root once, finds the images with the
image pattern, pairs masks (`pairing.py`), attaches labels (a `{class}` part of the
path or a CSV table), reads each file's split (a `{split}` part of the path, split
folders, or a split file), assigns groups (`data.group_by`), and selects one split:

  * "all": every item;
  * a split the data names (a `test/` folder, a split file): those items as they are;
  * otherwise carved from the train items (from everything when the data names no
    splits) with `val_fraction`/`test_fraction`/`seed`, stratified by class and keeping
    groups whole (`splits.carve`); with `num_folds` > 0 the val split is fold `fold` of a
    k-fold split by group of what the test carve leaves (`splits.kfold`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from medrep_jax.data import formats, pairing, splits
from medrep_jax.data.sources import DataError, check_fractions, check_split

# Top folders read as split folders when the image pattern has no {split} part.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
HINT = f"Check what the reader finds with `{pairing.INSPECT_HINT}`"


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to read (the folder-layout fields of a data config; see docs/data.md)."""
  images: str = "**/*"
  mask: pairing.MaskRule = pairing.MaskRule()
  roi: pairing.MaskRule = pairing.MaskRule(field="data.roi_mask")
  suffixes: tuple[str, ...] = ()          # () = every supported format
  class_part: str = "class"               # the named part that gives the class
  class_names: tuple[str, ...] = ()
  labels_csv: str = ""
  label_id_column: str = "id"
  label_columns: tuple[str, ...] = ()
  split_file: str = ""
  split_id_column: str = ""
  split_column: str = ""
  group_by: str = ""
  group_unmatched: str = "error"
  num_folds: int = 0
  fold: int = 0
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  unpaired: str = "error"                 # images with no mask: "error" or "skip"
  hint: str = ""                          # the expected layout, added to "no images" errors


@dataclasses.dataclass
class Item:
  path: str                      # relative to root, "/" separators
  masks: tuple[str, ...] = ()
  roi: str | None = None
  label: Any = None              # int class id, float32 multi-hot, or None
  group: str = ""
  split: str = ""                # "" = not named by the data
  parts: dict = dataclasses.field(default_factory=dict)  # named parts of the path
  sub: int | None = None         # the row of a stacked array file (a split unit of its own)


@dataclasses.dataclass
class Catalog:
  root: pathlib.Path
  items: list[Item]              # the selected split, in path order
  skipped: list[tuple[str, str]]
  class_names: tuple[str, ...]
  multi_label: bool
  total: int                     # items before the split was selected
  grouped: bool


def _resolve(root: pathlib.Path, rel: str) -> pathlib.Path:
  p = pathlib.Path(rel).expanduser()
  return p if p.is_absolute() else root / p


def _split_prefix(root: pathlib.Path, spec: Spec) -> bool:
  """Whether to read the pattern inside each split folder (`root/<split>/<pattern>`).

  Yes when top folders name splits and the image pattern starts with a plain folder
  or file name that is not a split folder (`images/*`, `{class}/*` do; `{split}/...`,
  `train/...`, `**/...` do not).
  """
  if "split" in pairing.part_names(spec.images):
    return False
  first = spec.images.strip("/").split("/", 1)[0]
  if first.lower() in SPLIT_FOLDERS or first.startswith(("**", "{dir}", "{path}")):
    return False
  tops = [p.name.lower() for p in root.iterdir() if p.is_dir()]
  return any(t in SPLIT_FOLDERS for t in tops)


def _prefixed(pattern: str) -> str:
  if not pattern or pattern.startswith(("{dir}", "{path}", "{split}")):
    return pattern
  return "{split}/" + pattern


def _keep(suffixes: Sequence[str]):
  if suffixes:
    lows = tuple(s.lower() for s in suffixes)
    return lambda name: name.lower().endswith(lows)
  return lambda name: formats.is_supported(name) or name.lower().endswith(".dcm")


def _no_images_error(root: pathlib.Path, spec: Spec, images: str, index: pairing.FileIndex,
                     skipped: list[tuple[str, str]]) -> DataError:
  sample = pairing.describe(index.files, 8) if index.files else "(no supported files)"
  why = ""
  if skipped:
    why = "\nskipped: " + "; ".join(f"{p}: {r}" for p, r in skipped[:3])
    if len(skipped) > 3:
      why += f" and {len(skipped) - 3} more"
  return DataError(
      f"no images under {root} match data.images={images!r}"
      f"{' with a mask (data.mask=' + repr(spec.mask.pattern or spec.mask.sub) + ')' if spec.mask.active else ''}."
      f"\nfiles found: {sample}{why}\nSet data.images (and data.mask) to patterns of these "
      f"paths (docs/data.md). {HINT}" + (f"\n{spec.hint}" if spec.hint else ""))


def build_catalog(root: str | pathlib.Path, split: str, spec: Spec,
                  rows: Callable[[Item], list[int] | None] | None = None) -> Catalog:
  """Lists, pairs, labels, groups and selects `split` (see the module docstring).

  Args:
    rows: for stacked arrays, item -> the rows it holds (None: not a stack). Each row
      becomes an item of its own before the split is carved (its own group unless
      data.group_by puts the file's rows together).
  """
  check_split(split)
  check_fractions(spec.val_fraction, spec.test_fraction)
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise DataError(f"data root folder {root} does not exist; check the path (data.root)")
  index = pairing.FileIndex(root, keep=_keep(spec.suffixes))
  prefix, images = split_prefix(root, spec)
  mask, roi = spec.mask, spec.roi
  if prefix:
    mask = dataclasses.replace(mask, pattern=_prefixed(mask.pattern))
    roi = dataclasses.replace(roi, pattern=_prefixed(roi.pattern))
  supported = _keep(spec.suffixes)
  cands = pairing.find_candidates(index, images, supported=supported)
  cands, skipped = pairing.pair(index, cands, mask, roi)
  _check_unpaired(root, spec, skipped)
  items = [Item(c.path, c.masks, c.roi, parts=c.parts) for c in cands]
  return finish_catalog(root, split, spec, items, skipped, prefix, rows=rows,
                        no_items=lambda: _no_images_error(root, spec, images, index,
                                                          skipped))


def split_prefix(root: pathlib.Path, spec: Spec) -> tuple[bool, str]:
  """(whether the pattern is read inside split folders, the image pattern to list)."""
  prefix = _split_prefix(root, spec)
  return prefix, _prefixed(spec.images) if prefix else spec.images


def finish_catalog(root: pathlib.Path, split: str, spec: Spec, items: list[Item],
                   skipped: list[tuple[str, str]], prefix: bool, *,
                   rows: Callable[[Item], list[int] | None] | None = None,
                   no_items: Callable[[], Exception] | None = None,
                   multi_label: bool = True) -> Catalog:
  """The steps after listing, shared by every folder-like source (images, volumes):
  label, carve splits, group, expand stacked rows, select `split`.

  Args:
    items: the listed items (paths relative to root); skipped collects (path, reason).
    prefix: whether the items were listed inside split folders (`split_prefix`).
    no_items: the error to raise when no item is left (default: a generic DataError).
    multi_label: False makes multi-label columns (data.label_columns) an error.
  """
  items, names, multi = _label(root, spec, items, skipped)
  if multi and not multi_label:
    raise DataError(f"{spec.labels_csv}: this source takes one label per case, not "
                    "multi-label columns (data.label_columns)")
  items = _assign_splits(root, spec, items, skipped, prefix)
  if not items:
    raise (no_items() if no_items else
           DataError(f"no items under {root} match data.images={spec.images!r}. {HINT}"))
  _assign_groups(spec, items)
  if rows is not None:
    items = _rows(spec, items, rows)
  chosen = select(root, split, spec, items)
  if not chosen:
    present = sorted({it.split for it in items if it.split})
    raise DataError(f"split {split!r} of {root} is empty ({len(items)} items in all"
                    f"{', splits named by the data: ' + str(present) if present else ''}; "
                    f"data.val_fraction={spec.val_fraction}, data.test_fraction="
                    f"{spec.test_fraction}). {HINT}")
  return Catalog(root, [items[i] for i in chosen], skipped, names, multi, len(items),
                 bool(spec.group_by))


def _check_unpaired(root: pathlib.Path, spec: Spec, skipped: list[tuple[str, str]]) -> None:
  if spec.unpaired not in ("error", "skip"):
    raise DataError(f"data.unpaired={spec.unpaired!r}; expected 'error' or 'skip'")
  lonely = [(p, r) for p, r in skipped if r.startswith("no ")]
  if spec.unpaired == "skip" or not lonely:
    return
  path, reason = lonely[0]
  more = f" ({len(lonely)} images in all: {pairing.describe([p for p, _ in lonely])})" if len(
      lonely) > 1 else ""
  raise DataError(f"image {root / path} has {reason}{more}. Fix data.mask (or data.mask_dir, "
                  "data.mask_suffix), add the mask, remove the image, or set "
                  f"data.unpaired='skip' (or data.skip_corrupt=True) to skip such images. "
                  f"{HINT}")


def _label(root: pathlib.Path, spec: Spec, items: list[Item],
           skipped: list[tuple[str, str]]) -> tuple[list[Item], tuple[str, ...], bool]:
  """Items with labels from the `{class}` part or the CSV; unlabelled ones are skipped."""
  if spec.labels_csv:
    table = splits.read_label_csv(_resolve(root, spec.labels_csv),
                                  id_column=spec.label_id_column,
                                  label_columns=tuple(spec.label_columns) or None,
                                  class_names=tuple(spec.class_names) or None)
    keep = []
    for it in items:
      label = table.lookup(it.path)
      if label is None:
        skipped.append((it.path, f"no row in the label table {spec.labels_csv} "
                        f"(data.labels_csv, id column {spec.label_id_column!r})"))
        continue
      it.label = label.copy() if table.multi_label else np.int32(label)
      keep.append(it)
    return keep, table.class_names, table.multi_label
  if spec.class_part not in pairing.part_names(spec.images):
    return items, (), False  # no labels: class_names has nothing to name
  found = sorted({it.parts[spec.class_part] for it in items})
  names = tuple(spec.class_names) or tuple(found)
  pos = {n: k for k, n in enumerate(names)}
  lower = {n.lower(): k for k, n in enumerate(names)}
  keep = []
  for it in items:
    value = it.parts[spec.class_part]
    k = pos.get(value, lower.get(value.lower()))
    if k is None:
      skipped.append((it.path, f"class folder {value!r} is not in data.class_names "
                      f"{list(names)}"))
      continue
    it.label = np.int32(k)
    keep.append(it)
  return keep, names, False


def _assign_splits(root: pathlib.Path, spec: Spec, items: list[Item],
                   skipped: list[tuple[str, str]], prefix: bool) -> list[Item]:
  table = splits.read_split_file(_resolve(root, spec.split_file),
                                 id_column=spec.split_id_column or None,
                                 split_column=spec.split_column or None) if spec.split_file else None
  index = splits.IdIndex(table) if table is not None else None
  keep = []
  for it in items:
    named = it.parts.get("split")
    top = it.path.split("/", 1)[0]
    if named is None and "/" in it.path and top.lower() in SPLIT_FOLDERS:
      named = top  # a file inside a split folder
    if named is not None:
      key = named.lower()
      if key not in SPLIT_FOLDERS and "split" in it.parts and not prefix:
        try:
          it.split = splits.normalize_split(named)
        except DataError:
          skipped.append((it.path, f"{named!r} is not a split name ({{split}} in data.images)"))
          continue
      elif key not in SPLIT_FOLDERS:
        skipped.append((it.path, "outside the split folders "
                        f"{sorted(set(SPLIT_FOLDERS))}"))
        continue
      else:
        it.split = SPLIT_FOLDERS[key]
    if index is not None:
      key = index.find(it.path) or (index.find(_strip_split(it.path)) if prefix else None)
      if key is None:
        skipped.append((it.path, f"not listed in the split file {spec.split_file} "
                        "(data.split_file)"))
        continue
      it.split = table[key]
    keep.append(it)
  return keep


def _rows(spec: Spec, items: list[Item], rows) -> list[Item]:
  out = []
  for it in items:
    subs = rows(it)
    if subs is None:
      out.append(it)
      continue
    out += [dataclasses.replace(it, sub=k, group=it.group if spec.group_by
                                else f"{it.group}#{k}") for k in subs]
  return out


def _strip_split(path: str) -> str:
  return path.split("/", 1)[1] if "/" in path else path


def _assign_groups(spec: Spec, items: list[Item]) -> None:
  """Groups from data.group_by, searched in the path below the split folder."""
  for it in items:
    top = it.path.split("/", 1)[0].lower()
    rel = _strip_split(it.path) if "/" in it.path and top in SPLIT_FOLDERS else it.path
    it.group = (splits.group_of(rel, spec.group_by, unmatched=spec.group_unmatched)
                if spec.group_by else it.path)


def select(root: pathlib.Path, split: str, spec: Spec, items: list[Item]) -> list[int]:
  if split == "all":
    return list(range(len(items)))
  present = {it.split for it in items if it.split}
  if split in present and split != "train":
    if split == "val" and spec.num_folds:
      raise DataError(f"{root} has its own val split, so data.num_folds={spec.num_folds} "
                      "has nothing to fold; set data.num_folds=0")
    return [i for i, it in enumerate(items) if it.split == split]
  if present and "train" not in present:
    raise DataError(f"{root}: the data names the splits {sorted(present)} but no train "
                    f"split to carve {split!r} from; read one of {sorted(present)} "
                    f"(or 'all'). {HINT}")
  pool = [i for i, it in enumerate(items) if not present or it.split == "train"]
  vf = 0.0 if "val" in present else spec.val_fraction
  tf = 0.0 if "test" in present else spec.test_fraction
  ids = [items[i].path if items[i].sub is None else f"{items[i].path}#{items[i].sub}"
         for i in pool]
  strata = _strata([items[i] for i in pool])
  groups = [items[i].group for i in pool] if spec.group_by else None
  if spec.num_folds:
    if split == "test":
      chosen = splits.carve(ids, "test", groups=groups, strata=strata, val_fraction=0.0,
                            test_fraction=tf, seed=spec.seed)
      return sorted(pool[i] for i in chosen)
    test = set(splits.carve(ids, "test", groups=groups, strata=strata, val_fraction=0.0,
                            test_fraction=tf, seed=spec.seed))
    rest = [j for j in range(len(pool)) if j not in test]
    train, val = splits.kfold([ids[j] for j in rest],
                              groups=[groups[j] for j in rest] if groups else None,
                              k=spec.num_folds, fold=spec.fold, seed=spec.seed)
    return sorted(pool[rest[j]] for j in (train if split == "train" else val))
  chosen = splits.carve(ids, split, groups=groups, strata=strata, val_fraction=vf,
                        test_fraction=tf, seed=spec.seed)
  return sorted(pool[i] for i in chosen)


def _strata(items: list[Item]) -> list[Any] | None:
  labels = [it.label for it in items]
  if not labels or labels[0] is None or np.ndim(labels[0]) > 0:
    return None
  return [int(l) for l in labels]

