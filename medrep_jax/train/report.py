"""WORKDIR/report.md: a short human-readable summary of a run or pipeline."""
from __future__ import annotations

import datetime
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

from medrep_jax.train.logging import read_metrics


def fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def loss_curve(workdir: pathlib.Path) -> str | None:
  """Plots the train loss and each logged loss term (`loss/<term>`, e.g. DCL-CsTP's nce,
  kl and cs) from metrics.jsonl into figures/loss.png."""
  rows = [r for r in read_metrics(workdir, "train") if "loss" in r]
  if len(rows) < 2:
    return None
  from medrep_jax.eval import figures
  path = workdir / "figures" / "loss.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  terms = sorted({k for r in rows for k in r if k.startswith("loss/")})
  series = {"train loss": [r["loss"] for r in rows]}
  for k in terms:
    if all(k in r for r in rows):
      series[k[len("loss/"):]] = [r[k] for r in rows]
  figures.curve_figure([r["step"] for r in rows], series, path, xlabel="step", ylabel="loss")
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


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def report_parts(path: str | os.PathLike) -> list[str | pathlib.Path]:
  """A report.md cut into markdown text and the absolute paths of its images, in order.

  The report links its figures relative to its folder (`figures/loss.png`), which a
  notebook cell cannot follow. Show the parts one after the other instead:

      for part in report_parts(f"{workdir}/report.md"):
        display(Image(filename=str(part)) if isinstance(part, pathlib.Path) else Markdown(part))

  A link to a file that does not exist (or to a URL) stays in the text.
  """
  path = pathlib.Path(path)
  text, base = path.read_text(), path.parent
  parts: list[str | pathlib.Path] = []
  start = 0
  for link in _IMAGE_LINK.finditer(text):
    target = base / link.group(2)
    if "://" in link.group(2) or not target.is_file():
      continue
    parts += [text[start:link.start()], target.resolve()]
    start = link.end()
  parts.append(text[start:])
  return [p for p in parts if not isinstance(p, str) or p.strip()]
