"""Multi-stage pipelines: `config.stages` lists stage names, `config.<name>` their configs.

Each stage runs in `WORKDIR/<name>/`. A string field of the form `stage:NAME[/sub/path]`
(e.g. `init_from = "stage:pretrain"`, or a data root pointing at generated images) is
resolved to `WORKDIR/NAME[/sub/path]`. A stage whose workdir holds `done.json` is skipped,
so re-running a pipeline resumes at the first unfinished stage.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc

from medrep_jax.train import report as report_lib
from medrep_jax.train import trainer


def is_pipeline(config) -> bool:
  return "stages" in config


def resolve_stage_refs(config: mlc.ConfigDict, workdir: pathlib.Path,
                       known: list[str]) -> mlc.ConfigDict:
  """Returns a copy with every `stage:NAME...` string replaced by a path under workdir."""
  out = mlc.ConfigDict(config.to_dict())

  def visit(node: mlc.ConfigDict, prefix: str):
    for key in list(node.keys()):
      value = node[key]
      if isinstance(value, mlc.ConfigDict):
        visit(value, f"{prefix}{key}.")
      elif isinstance(value, str) and value.startswith("stage:"):
        name, _, rest = value[len("stage:"):].partition("/")
        if name not in known:
          raise ValueError(f"{prefix}{key}={value!r} refers to stage {name!r}, which does "
                           f"not run before this one; earlier stages: {known}")
        node[key] = str(workdir / name / rest) if rest else str(workdir / name)

  visit(out, "")
  return out


def run_pipeline(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs the stages in order, skipping finished ones; writes a pipeline report.md."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  trainer.write_config(config, workdir)
  stages = list(config.stages)
  for name in stages:
    if name not in config:
      raise ValueError(f"stage {name!r} is listed in config.stages but config.{name} is "
                       f"missing; stages present: {[k for k in config if k != 'stages']}")
  results: dict[str, Any] = {}
  for i, name in enumerate(stages):
    stage_dir = workdir / name
    done = stage_dir / "done.json"
    if done.exists():
      print(f"[pipeline] stage {i + 1}/{len(stages)} '{name}': done, skipping")
      results[name] = json.loads(done.read_text())
      continue
    print(f"[pipeline] stage {i + 1}/{len(stages)} '{name}' -> {stage_dir}")
    stage_cfg = resolve_stage_refs(config[name], workdir, stages[:i])
    results[name] = trainer.train_and_evaluate(stage_cfg, stage_dir)
  if jax.process_index() == 0:
    write_pipeline_report(workdir, stages, results)
  return results


def write_pipeline_report(workdir: pathlib.Path, stages: list[str],
                          results: dict[str, Any]) -> pathlib.Path:
  lines = ["# Pipeline report", "", "| stage | report |", "|---|---|"]
  lines += [f"| {s} | [{s}/report.md]({s}/report.md) |" for s in stages]
  lines += ["", "## Final metrics per stage", ""]
  lines += ["| stage | metric | value |", "|---|---|---|"]
  for s in stages:
    lines += [f"| {s} | {k} | {report_lib.fmt(v)} |" for k, v in _headline(results[s]).items()]
  for s in stages:
    figs = sorted((workdir / s / "figures").glob("*.png"))
    if figs:
      lines += ["", f"### {s}", ""]
      lines += [f"![{f.stem}]({s}/figures/{f.name})" for f in figs]
  path = workdir / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return path


def _headline(result: dict[str, Any]) -> dict[str, Any]:
  """A stage's eval metrics, or all its numbers for a stage that does not train."""
  evals = {k: v for k, v in result.items() if k.startswith("eval/")}
  return evals or {k: v for k, v in result.items() if isinstance(v, (int, float))}
