"""Metric sinks: WORKDIR/metrics.jsonl (the contract) and TensorBoard events in WORKDIR/tb."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(np.mean(v))


class MetricWriter:
  """Appends one JSON object per logging step and mirrors scalars to TensorBoard.

  Only process 0 writes. On resume, `truncate_after(step)` drops records written after
  the restored checkpoint (they will be recomputed), so the file never holds duplicates.
  """

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"), flush_secs=30)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict:
    record = {"step": int(step), "split": split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.active:
      return record
    with self.path.open("a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k if "/" in k or split == "train" else f"{split}/{k}", v, step)
    return record

  def truncate_after(self, step: int) -> None:
    if not (self.active and self.path.exists()):
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

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
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if split is None or r.get("split") == split]
