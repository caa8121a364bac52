"""WORKDIR/report.md: a short human-readable summary of a run or pipeline."""
from __future__ import annotations

import datetime
import pathlib
from typing import Any, Mapping, Sequence

from medrep_jax.train.logging import read_metrics


def fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def loss_curve(workdir: pathlib.Path) -> str | None:
  """Plots train loss (and eval metrics) from metrics.jsonl into figures/loss.png."""
  rows = [r for r in read_metrics(workdir, "train") if "loss" in r]
  if len(rows) < 2:
    return None
  from medrep_jax.eval import figures
  path = workdir / "figures" / "loss.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  figures.curve_figure([r["step"] for r in rows], {"train loss": [r["loss"] for r in rows]},
                       path, xlabel="step", ylabel="loss")
  return str(path.relative_to(workdir))


def write_report(workdir: pathlib.Path, config, final: Mapping[str, Any],
                 figures: Mapping[str, str], extra: Sequence[str] = ()) -> pathlib.Path:
  """Writes report.md with the final metrics table and links to figures."""
  workdir = pathlib.Path(workdir)
  figs = dict(figures)
  curve = loss_curve(workdir)
  if curve:
    figs = {"train loss": curve, **figs}
  data, train = config.get("data", {}), config.get("train", {})
  stage = f" (stage {config.stage})" if "stage" in config else ""
  lines = [f"# {config.method}{stage} run report", "",
           f"- workdir: `{workdir}`",
           f"- finished: {datetime.datetime.now().isoformat(timespec='seconds')}",
           f"- data: `{data.get('name', '')}`  steps: {train.get('num_steps', '-')}  "
           f"batch: {train.get('batch_size', '-')}  dtype: {config.get('dtype', '-')}",
           "", "## Final metrics", ""]
  lines += ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {fmt(v)} |" for k, v in final.items()]
  if figs:
    lines += ["", "## Figures", ""]
    for title, rel in figs.items():
      lines += [f"### {title}", "", f"![{title}]({rel})", ""]
  if extra:
    lines += ["", *extra]
  path = workdir / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return path
