"""Training curves of several runs side by side: one panel per metric, one line per run.

    python -m launch.curves runs/a runs/b --labels a b \
        --metrics loss/nce loss/cs global/top1 [--chance loss/nce=6.93] \
        --out curves.png [--table curves.md --at 50 100 200]

Reads each run's train rows from ``metrics.jsonl`` (what the trainer logs every
``train.log_every`` steps). ``--table`` also writes a markdown table of each metric at
the ``--at`` steps (the logged row at or just before each step), so a results page can
quote the numbers behind the figure.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Sequence

from medrep_jax.eval import figures
from medrep_jax.train.logging import read_metrics


def load_curves(runs: Sequence[str], metrics: Sequence[str]
                ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
  """metric -> run -> (steps, values), from the train rows that hold the metric."""
  out: dict[str, dict[str, tuple[list[int], list[float]]]] = {m: {} for m in metrics}
  for run in runs:
    rows = read_metrics(run, "train")
    if not rows:
      raise SystemExit(f"{run}: no train rows in {pathlib.Path(run) / 'metrics.jsonl'}")
    for m in metrics:
      got = [(int(r["step"]), float(r[m])) for r in rows if m in r]
      if got:
        out[m][run] = ([s for s, _ in got], [v for _, v in got])
  return out


def value_at(curve: tuple[list[int], list[float]], step: int) -> float | None:
  """The logged value at `step`, or at the last logged step before it; None before the
  first logged step and after the run's last."""
  steps, values = curve
  if not steps or step > steps[-1]:
    return None
  before = [v for s, v in zip(steps, values) if s <= step]
  return before[-1] if before else None


def table(curves, labels: dict[str, str], at: Sequence[int]) -> list[str]:
  lines = ["| run | metric | " + " | ".join(f"step {s}" for s in at) + " |",
           "|---|---|" + "---|" * len(at)]
  for run, label in labels.items():
    for m, per_run in curves.items():
      if run in per_run:
        cells = [value_at(per_run[run], s) for s in at]
        lines.append(f"| {label} | {m} | " + " | ".join(
            "-" if c is None else f"{c:.3f}" for c in cells) + " |")
  return lines


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m launch.curves", description=__doc__)
  p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
  p.add_argument("--labels", nargs="*", default=None, help="one label per run")
  p.add_argument("--metrics", nargs="+", default=["loss"])
  p.add_argument("--chance", nargs="*", default=[], help="METRIC=VALUE reference lines")
  p.add_argument("--out", default="curves.png")
  p.add_argument("--table", default=None, help="also write a markdown table here")
  p.add_argument("--at", nargs="*", type=int, default=[])
  a = p.parse_args(argv)
  labels = a.labels or [pathlib.Path(r).name for r in a.runs]
  if len(labels) != len(a.runs):
    raise SystemExit(f"--labels: {len(labels)} labels for {len(a.runs)} runs")
  names = dict(zip(a.runs, labels))
  hlines = {}
  for item in a.chance:
    key, _, value = item.partition("=")
    if key not in a.metrics or not value:
      raise SystemExit(f"--chance {item!r}: expected METRIC=VALUE with METRIC in --metrics")
    hlines[key] = float(value)
  curves = load_curves(a.runs, a.metrics)
  panels = {m: {names[r]: c for r, c in per_run.items()} for m, per_run in curves.items()}
  print(figures.curve_panels_figure(panels, a.out, hlines=hlines))
  if a.table:
    lines = table(curves, names, a.at or sorted({s for pr in curves.values()
                                                   for st, _ in pr.values() for s in st})[-1:])
    pathlib.Path(a.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
  main()
