"""Metric sinks: WORKDIR/metrics.jsonl (the contract) and TensorBoard events in WORKDIR/tb
(scalars, the learning rate among them, and the report's figures as images)."""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np


def _parse(line: str) -> dict | None:
  """One metrics.jsonl record, or None for a blank or half-written line."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row if isinstance(row, dict) else None


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(np.mean(v))


def _read_png(path: pathlib.Path) -> np.ndarray | None:
  """An image file as (H, W, 3) uint8, or None when it cannot be read."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError):  # missing, half-written or not an image
    return None


class MetricWriter:
  """Appends one JSON object per logging step and mirrors scalars to TensorBoard.

  Only process 0 writes. On resume, `truncate_after(step)` drops records written after
  the restored checkpoint (they will be recomputed), so the file never holds duplicates.
  Nothing is created before the first record: the TensorBoard folder `tb/` appears with
  the first write.
  """

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.active = jax.process_index() == 0
    self.tensorboard = tensorboard
    self._tb = None

  def _tb_writer(self):
    if self._tb is None and self.active and self.tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.workdir / "tb"), flush_secs=30)
    return self._tb

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict:
    record = {"step": int(step), "split": split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.active:
      return record
    with self.path.open("a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    tb = self._tb_writer()
    if tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          tb.add_scalar(k if "/" in k or split == "train" else f"{split}/{k}", v, step)
    return record

  def write_figures(self, step: int, figures: Mapping[str, str | os.PathLike]) -> list[str]:
    """Adds each figure (a PNG; a path relative to the workdir, as in `Result.figures`)
    to TensorBoard's Images tab as `figures/<title>` (spaces become `_`) at `step`.

    A figure whose file is missing or unreadable is skipped: figures are for people, and
    the run goes on. Returns the tags written.
    """
    tb = self._tb_writer() if figures else None
    if tb is None:
      return []
    written = []
    for title, path in figures.items():
      image = _read_png(self.workdir / path)
      if image is not None:
        tag = "figures/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", title)  # TensorBoard's tag charset
        tb.add_image(tag, image, int(step), dataformats="HWC")
        written.append(tag)
    return written

  def truncate_after(self, step: int) -> None:
    """Keeps the records up to `step`; drops later ones and any half-written line (a run
    killed mid-write). The file is replaced atomically."""
    if not (self.active and self.path.exists()):
      return
    kept = [line for line in self.path.read_text().splitlines()
            if (row := _parse(line)) is not None and row.get("step", 0) <= step]
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str | pathlib.Path, split: str | None = None) -> list[dict]:
  """Reads WORKDIR/metrics.jsonl (optionally one split)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [row for line in path.read_text().splitlines() if (row := _parse(line)) is not None]
  return [r for r in rows if split is None or r.get("split") == split]
