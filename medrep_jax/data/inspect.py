"""The data inspector: what a data config reads, split by split, without training.

`python -m medrep_jax.data inspect` (see `__main__.py`) calls `inspect_data`, which
builds each split's source with `registry.get_source` and reports: items and image/mask
pairs per split, files skipped and why, image sizes, channels, dtypes and value ranges
(from a sample), mask values, class counts, groups per split (and groups found in two
splits), and writes a contact sheet PNG of a few images with their masks overlaid.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from medrep_jax.data import registry
from medrep_jax.data.sources import SPLITS, DataError, Source

MAX_SKIPPED_SHOWN = 5
_COLORS = np.array([(40, 230, 90), (230, 25, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)], np.float32)


def _sample_indices(n: int, samples: int) -> list[int]:
  """Up to `samples` indices spread evenly over [0, n)."""
  if n <= 0 or samples <= 0:
    return []
  return sorted(set(np.linspace(0, n - 1, min(n, samples)).round().astype(int).tolist()))


def _labels_of(source: Source, records: list[dict]) -> tuple[np.ndarray | None, bool]:
  """All labels of a source when it keeps them (`source.labels`), else the sample's."""
  labels = getattr(source, "labels", None)
  if labels is not None and not callable(labels):
    return np.asarray(labels), False
  got = [r["label"] for r in records if "label" in r]
  return (np.stack([np.asarray(g) for g in got]), True) if got else (None, True)


def summarize(source: Source, *, samples: int = 16) -> dict[str, Any]:
  """Counts and statistics of one split's source (a sample of `samples` records)."""
  info = source.info
  records = []
  errors = []
  for i in _sample_indices(len(source), samples):
    try:
      records.append(source[i])
    except DataError as e:
      errors.append(str(e))
  images = [np.asarray(r["image"]) for r in records]
  masks = [np.asarray(r["mask"]) for r in records if "mask" in r]
  labels, from_sample = _labels_of(source, records)
  counts = None
  if labels is not None and labels.size:
    names = list(info.class_names) or [str(k) for k in range(int(labels.max()) + 1)]
    if labels.ndim == 2:  # multi-hot
      counts = {names[k] if k < len(names) else str(k): int(v)
                for k, v in enumerate(labels.sum(0))}
    else:
      found = collections.Counter(labels.astype(int).tolist())
      counts = {(names[k] if 0 <= k < len(names) else str(k)): found.get(k, 0)
                for k in range(max(len(names), max(found) + 1))}
  groups = getattr(source, "groups", None)
  skipped = list(getattr(source, "skipped", []) or [])
  return dict(
      items=len(source),
      pairs=len(source) if info.has_mask else None,
      skipped=skipped,
      num_skipped=max(len(skipped), int(getattr(source, "num_skipped_at_init", 0))),
      sampled=records,
      sample_errors=errors,
      sizes=collections.Counter("x".join(map(str, x.shape[:3 if x.ndim == 4 else 2]))
                                for x in images),  # DxHxW for whole volumes
      channels=collections.Counter(x.shape[-1] if x.ndim in (3, 4) else 1 for x in images),
      dtypes=collections.Counter(str(x.dtype) for x in images),
      value_range=(min(float(x.min()) for x in images), max(float(x.max()) for x in images))
      if images else None,
      mask_values=sorted(set().union(*(np.unique(m).tolist() for m in masks))) if masks else None,
      foreground=float(np.mean([np.mean(m > 0) for m in masks])) if masks else None,
      class_counts=counts,
      counts_from_sample=from_sample,
      groups=None if groups is None else [str(g) for g in groups],
  )


def _fmt(value: float) -> str:
  return f"{value:.4g}"


def _counter(c: collections.Counter, limit: int = 4) -> str:
  items = c.most_common()
  text = ", ".join(f"{k} ({v})" for k, v in items[:limit])
  return text + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _sizes(c: collections.Counter) -> str:
  """'256x256 (16)', or the range when the sample has more than 3 sizes."""
  if len(c) <= 3:
    return f"size {_counter(c)}"
  hw = np.array([[int(v) for v in k.split("x")] for k in c])
  spans = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(hw.min(0), hw.max(0))]
  return f"{len(c)} sizes, H {spans[0]}, W {spans[1]}"


def format_split(split: str, s: dict[str, Any], samples: int) -> list[str]:
  """The report lines of one split's summary."""
  pairs = f" ({s['pairs']} image/mask pairs)" if s["pairs"] is not None else ""
  lines = [f"[{split}] {s['items']} items{pairs}"]
  lines.append(f"  skipped: {s['num_skipped']}")
  for path, reason in s["skipped"][:MAX_SKIPPED_SHOWN]:
    lines.append(f"    {path}: {reason}")
  if len(s["skipped"]) > MAX_SKIPPED_SHOWN:
    lines.append(f"    ... and {len(s['skipped']) - MAX_SKIPPED_SHOWN} more")
  n = len(s["sampled"])
  if n:
    lo, hi = s["value_range"]
    lines.append(f"  images (sample of {n}): {_sizes(s['sizes'])}; channels "
                 f"{_counter(s['channels'])}; dtype {_counter(s['dtypes'])}; "
                 f"values [{_fmt(lo)}, {_fmt(hi)}]")
  for e in s["sample_errors"][:MAX_SKIPPED_SHOWN]:
    lines.append(f"  unreadable in the sample: {e}")
  if s["mask_values"] is not None:
    values = s["mask_values"]
    shown = ", ".join(map(str, values[:12])) + (", ..." if len(values) > 12 else "")
    lines.append(f"  masks (sample): values {{{shown}}}; foreground "
                 f"{100 * s['foreground']:.1f}% of pixels")
  if s["class_counts"] is not None:
    where = f" (in the sample of {n})" if s["counts_from_sample"] else ""
    text = ", ".join(f"{k} {v}" for k, v in s["class_counts"].items())
    lines.append(f"  classes{where}: {text}")
  if s["groups"] is not None:
    n_groups = len(set(s["groups"]))
    note = " (one per item: no data.group_by)" if n_groups == s["items"] else ""
    lines.append(f"  groups: {n_groups}{note}")
  return lines


def _leaks(summaries: dict[str, dict]) -> list[str]:
  owner: dict[str, list[str]] = collections.defaultdict(list)
  for split, s in summaries.items():
    for g in set(s["groups"] or ()):
      owner[g].append(split)
  return sorted(f"{g} ({', '.join(v)})" for g, v in owner.items() if len(v) > 1)


def inspect_data(data_cfg: Any, *, splits: Sequence[str] = SPLITS, samples: int = 16,
                 output: str | os.PathLike | None = None,
                 echo: Callable[[str], Any] = print) -> dict[str, Any]:
  """Builds every split of `data_cfg`, prints what it finds and writes a contact sheet.

  Args:
    data_cfg: a data ConfigDict (`registry.data_config(name, ...)`, or a run config's
      `config.data`).
    splits: the splits to build.
    samples: records decoded per split for sizes, value ranges and masks.
    output: the contact sheet PNG (None: no sheet).
    echo: where lines go.

  Returns:
    {"summaries": {split: summary}, "errors": {split: message}, "sheet": path or None}.

  Raises:
    DataError: when no split can be built (the first split's error).
  """
  echo(f"data: {data_cfg.name} ({registry.PRESETS.get(data_cfg.name, {}).get('kind', '?')})"
       f"  root: {data_cfg.get('root', '') or '(preset default)'}")
  summaries, failures, first = {}, {}, None
  for split in splits:
    try:
      source = registry.get_source(data_cfg, split)
    except DataError as e:
      failures[split] = str(e)
      first = first or e
      continue
    summaries[split] = summarize(source, samples=samples)
    info = source.info
  if not summaries:
    raise first
  classes = f"{info.num_classes} {list(info.class_names)}" if info.num_classes else "none"
  echo(f"classes: {classes}; channels: {info.channels}; "
       f"image dtype: {info.image_dtype}; masks: "
       f"{f'{info.num_mask_classes} classes' if info.has_mask else 'none'}"
       f"{'; multi-label' if info.multi_label else ''}")
  echo(f"{'split':<6} {'items':>6} {'pairs':>6} {'skipped':>8} {'groups':>7}")
  for split in splits:
    if split in summaries:
      s = summaries[split]
      groups = "-" if s["groups"] is None else str(len(set(s["groups"])))
      pairs = "-" if s["pairs"] is None else str(s["pairs"])
      echo(f"{split:<6} {s['items']:>6} {pairs:>6} {s['num_skipped']:>8} {groups:>7}")
    else:
      echo(f"{split:<6} not available")
  for split in splits:
    if split in summaries:
      for line in format_split(split, summaries[split], samples):
        echo(line)
    else:
      echo(f"[{split}] not available: {failures[split]}")
  leaks = _leaks(summaries)
  if leaks:
    echo(f"WARNING: {len(leaks)} group(s) are in more than one split: "
         f"{', '.join(leaks[:5])}{' ...' if len(leaks) > 5 else ''}")
  sheet = None
  if output:
    pool = [(split, r) for split, s in summaries.items() for r in s["sampled"]]
    shown = [pool[i] for i in _sample_indices(len(pool), 8)]
    sheet = contact_sheet(shown, output, class_names=info.class_names)
    echo(f"contact sheet: {sheet}")
  return dict(summaries=summaries, errors=failures, sheet=sheet)


# ---------------------------------------------------------------- contact sheet


def _display(image: np.ndarray) -> np.ndarray:
  """(H, W, C) any dtype -> (H, W, 3) uint8 (uint8 as is; others min-max per image)."""
  x = np.asarray(image)
  x = x[..., :3] if x.ndim == 3 and x.shape[-1] >= 3 else (x[..., 0] if x.ndim == 3 else x)
  if x.dtype != np.uint8:
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    x = np.round(255 * (x - lo) / (hi - lo)) if hi > lo else np.zeros_like(x)
    x = x.astype(np.uint8)
  return np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x


def overlay(image: np.ndarray, mask: np.ndarray | None, alpha: float = 0.4) -> np.ndarray:
  """The image as RGB uint8, mask classes > 0 alpha-filled and their boundaries opaque."""
  rgb = _display(image).astype(np.float32)
  if mask is None:
    return rgb.astype(np.uint8)
  mask = np.asarray(mask).astype(np.int64)
  if mask.shape != rgb.shape[:2]:
    return rgb.astype(np.uint8)
  fg = mask > 0
  color = _COLORS[(mask - 1) % len(_COLORS)]
  rgb[fg] = (1 - alpha) * rgb[fg] + alpha * color[fg]
  edge = np.zeros_like(fg)
  edge[1:] |= mask[1:] != mask[:-1]
  edge[:-1] |= mask[1:] != mask[:-1]
  edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
  edge[:, :-1] |= mask[:, 1:] != mask[:, :-1]
  edge &= fg
  rgb[edge] = color[edge]
  return np.round(rgb).astype(np.uint8)


def contact_sheet(items: Sequence[tuple[str, dict]], path: str | os.PathLike, *,
                  class_names: Sequence[str] = (), cell: int = 160, columns: int = 4) -> str:
  """Writes a PNG grid of (split, record) items: image with its mask overlaid, captioned
  with split, index, label and size. Returns the path."""
  if not items:
    raise DataError("no readable records to draw a contact sheet from")
  columns = min(columns, len(items))
  rows = -(-len(items) // columns)
  caption = 14
  sheet = Image.new("RGB", (columns * cell, rows * (cell + caption)), (24, 24, 24))
  draw = ImageDraw.Draw(sheet)
  for n, (split, r) in enumerate(items):
    image, mask = np.asarray(r["image"]), r.get("mask")
    if image.ndim == 4:  # a whole volume (D, H, W, C): its middle slice
      image, mask = image[len(image) // 2], None if mask is None else mask[len(mask) // 2]
    tile = Image.fromarray(overlay(image, mask))
    scale = cell / max(tile.width, tile.height)
    tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                       Image.NEAREST if scale > 1 else Image.BILINEAR)
    x, y = (n % columns) * cell, (n // columns) * (cell + caption)
    sheet.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
    label = r.get("label")
    text = f"{split} #{int(r.get('index', n))} {image.shape[0]}x{image.shape[1]}"
    if label is not None and np.ndim(label) == 0:
      k = int(label)
      text += f" {class_names[k] if k < len(class_names) else k}"
    draw.text((x + 3, y + cell + 1), text, fill=(230, 230, 230))
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  sheet.save(path, format="PNG")
  return path
