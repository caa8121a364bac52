"""Mean ± std of runs over seeds, and paired differences with a 95% t-interval.

    python -m launch.seed_compare 'runs/drfl_lung_s{seed}/{variant}' --seeds 0 1 2 \
        --variants unet ss ss_srs dfm dfm_rftm dfm_rftm_cbam drfl --pairs drfl-ss dfm-ss \
        --metrics eval/dice eval/iou eval/pixel_accuracy [--scale 100] [--out table.md]

PATTERN names one run directory per (seed, variant); each run's final metrics come from
its ``done.json`` (``launch.sweep_table.run_metrics``). A cell is mean ± std (sample std,
ddof = 1) over the seeds the run exists for, with n. A pair ``a-b`` is the per-seed
difference a - b over the seeds both exist for: mean, and the 95% interval
mean ± t_{0.975, n-1} s / sqrt(n) (Student's t, the seeds as pairs). With n = 3 the
interval is wide (t = 4.30): it says how much the seed spread allows, not more.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Sequence

import numpy as np
from scipy import stats

from launch.sweep_table import run_metrics


def collect(pattern: str, seeds: Sequence[int], variants: Sequence[str],
            metrics: Sequence[str]) -> dict[str, dict[int, dict[str, float]]]:
  """variant -> seed -> metric -> value, for the finished runs only."""
  out: dict[str, dict[int, dict[str, float]]] = {}
  for v in variants:
    for s in seeds:
      status, values = run_metrics(pathlib.Path(pattern.format(seed=s, variant=v)))
      if status == "done" and all(m in values for m in metrics):
        out.setdefault(v, {})[s] = {m: float(values[m]) for m in metrics}
  return out


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95
                    ) -> tuple[float, float, float, int]:
  """(mean, low, high, n) of a - b: Student's t interval over the n pairs (NaN if n < 2)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = len(d)
  if n < 2:
    return (float(d.mean()) if n else float("nan")), float("nan"), float("nan"), n
  half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n)
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def _cell(values: Sequence[float], scale: float) -> str:
  v = np.asarray(values) * scale
  if len(v) == 1:
    return f"{v[0]:.2f} (n=1)"
  return f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (n={len(v)})"


def render(table: dict[str, dict[int, dict[str, float]]], variants: Sequence[str],
           metrics: Sequence[str], pairs: Sequence[str], scale: float = 1.0) -> str:
  """The markdown tables: one row per variant, then one row per pair and metric."""
  lines = ["| variant | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
  for v in variants:
    if v in table:
      cells = [_cell([r[m] for r in table[v].values()], scale) for m in metrics]
      lines.append(f"| {v} | " + " | ".join(cells) + " |")
  if pairs:
    lines += ["", "| pair | metric | mean difference | 95% interval | n |", "|---|---|---|---|---|"]
  for pair in pairs:
    a, b = pair.split("-", 1)
    seeds = sorted(set(table.get(a, {})) & set(table.get(b, {})))
    for m in metrics:
      mean, lo, hi, n = paired_interval([table[a][s][m] for s in seeds],
                                        [table[b][s][m] for s in seeds])
      lines.append(f"| {a} − {b} | {m} | {scale * mean:+.2f} | "
                   f"[{scale * lo:+.2f}, {scale * hi:+.2f}] | {n} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(prog="python -m launch.seed_compare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("pattern", help="run directory with {seed} and {variant} placeholders")
  p.add_argument("--seeds", type=int, nargs="+", required=True)
  p.add_argument("--variants", nargs="+", default=[""])
  p.add_argument("--metrics", nargs="+", default=["eval/dice"])
  p.add_argument("--pairs", nargs="*", default=[], help="a-b: per-seed differences a - b")
  p.add_argument("--scale", type=float, default=1.0, help="multiply values (100: percent)")
  p.add_argument("--out", default=None, help="also write the tables to this file")
  args = p.parse_args(argv)
  for pair in args.pairs:
    if "-" not in pair or any(v not in args.variants for v in pair.split("-", 1)):
      p.error(f"--pairs {pair!r}: expected a-b with a and b among --variants")
  table = collect(args.pattern, args.seeds, args.variants, args.metrics)
  if not table:
    p.error(f"no finished run matches {args.pattern!r} for seeds {args.seeds}")
  text = render(table, args.variants, args.metrics, args.pairs, args.scale)
  print(text, end="")
  if args.out:
    pathlib.Path(args.out).write_text(text)
  return text


if __name__ == "__main__":
  main()
