"""Multi-stage pipelines: `config.stages` lists stage names, `config.<name>` their configs.

Each stage runs in `WORKDIR/<name>/`. A string field of the form `stage:NAME[/sub/path]`
(e.g. `init_from = "stage:pretrain"`, or a data root pointing at generated images) is
resolved to `WORKDIR/NAME[/sub/path]`. A stage whose workdir holds `done.json` is skipped,
so re-running a pipeline resumes at the first unfinished stage.

The pipeline root is locked for the whole run (its stages run inside the lock). Its
config.json is checked like a single run's (`core.workdir.check_config`): a change to a
finished stage is refused; a change to a stage that has a checkpoint, or to the stage
list once a stage has run, needs `allow_config_change`; a change to a stage that has not
started only gets recorded in config_history.jsonl. The root config.json is written once
a stage has passed its own checks.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax import errors
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.core import workdir as workdir_lib
from medrep_jax.data.sources import DataError
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
          raise config_lib.ConfigError(
              f"{prefix}{key}={value!r} refers to stage {name!r}, which does not run before "
              f"this one; earlier stages: {known}")
        node[key] = str(workdir / name / rest) if rest else str(workdir / name)

  visit(out, "")
  return out


def _stage_ref_keys(config) -> tuple[str, ...]:
  """The dotted keys of a stage config whose values are `stage:NAME...` references."""
  flat = workdir_lib.config_diff({}, config, ignore=())
  return tuple(k for k, (_, v) in flat.items() if isinstance(v, str) and v.startswith("stage:"))


def _stage_status(stage_dir: pathlib.Path) -> str:
  """"done" (done.json), "started" (a checkpoint to resume) or "new"."""
  if (stage_dir / "done.json").exists():
    return "done"
  if ckpt_lib.Checkpointer(stage_dir / "checkpoints", every=0, keep=1).latest_step() is not None:
    return "started"
  return "new"


def check_pipeline_config(config, workdir: pathlib.Path, *,
                          allow: bool) -> dict[str, tuple[Any, Any]]:
  """Compares a pipeline config with the root config.json; returns the changes to record.

  Raises:
    ConfigChanged: a finished stage's config changed, or a started stage's (or the stage
      list, once a stage has run) without `allow`.
  """
  old = workdir_lib.read_config(workdir)
  if old is None:
    return {}
  changes = workdir_lib.config_diff(old, config)
  for stage in config.stages:  # fields a newer release added, at their defaults
    changes = workdir_lib.added_at_default(changes, str(config[stage].get("method", "")),
                                           (stage,))
  if not changes:
    return {}
  names = set(config.stages) | set(old.get("stages", ()))
  touched = {key.split(".", 1)[0] if key.split(".", 1)[0] in names else None
             for key in changes}
  status = {s: _stage_status(workdir / s) for s in names}
  listing = workdir_lib.format_changes(changes)
  where = workdir / "config.json"
  done = sorted(s for s in touched if s is not None and status[s] == "done")
  if done:
    raise errors.ConfigChanged(
        f"this config changes finished stage(s) {done} of the pipeline in {workdir} "
        f"({where}):\n{listing}\nNothing was changed. Use a new --workdir for the new "
        f"values (a stage can start from a finished one with init_from=<its workdir>).",
        changes)
  ran = any(v != "new" for v in status.values())
  started = sorted(s for s in touched if s is not None and status[s] == "started")
  if (started or (None in touched and ran)) and not allow:
    what = (f"stage(s) {started}, which have checkpoints" if started
            else "the pipeline's stages, some of which have run")
    raise errors.ConfigChanged(
        f"this config changes {what}, in {workdir} ({where}):\n{listing}\nResuming would "
        f"mix two configs in one run, so nothing was changed. Re-run with the original "
        f"values, use a new --workdir, or pass --allow_config_change (the change is "
        f"recorded in {workdir_lib.HISTORY_NAME}).", changes)
  return changes


def preflight(config, workdir: pathlib.Path) -> dict[str, int]:
  """Checks every unfinished stage's config against its data before the first one runs.

  Each stage's `preflight` sees what the earlier unfinished stages will write (their
  workdirs, and the most images their output folders will hold, e.g. a sample stage's
  images/), so that a later stage that cannot fit its data (a memory bank larger than
  real + synthetic images, a batch larger than the split, an image size the network
  cannot take: `base.Method.check_shapes` traces each training stage's model on the
  batch it will be fed) fails now, not after hours of earlier stages. Returns the plan
  ({folder: most images}).

  Raises:
    ConfigError / DataError: prefixed with the stage that failed.
  """
  from medrep_jax import methods  # pylint: disable=g-import-not-at-top
  stages = list(config.stages)
  planned: dict[str, int] = {}
  for i, name in enumerate(stages):
    stage_dir = workdir / name
    if (stage_dir / "done.json").exists():
      continue
    cfg = resolve_stage_refs(config[name], workdir, stages[:i])
    try:
      planned.update(methods.load_method(cfg, workdir=stage_dir).preflight(planned))
    except (config_lib.ConfigError, DataError) as e:
      raise type(e)(f"pipeline pre-flight, stage {i + 1}/{len(stages)} '{name}' (no stage "
                    f"has run; {workdir} is unchanged): {e}") from e
    planned.setdefault(str(stage_dir), 0)
  return planned


def run_pipeline(config, workdir: str | pathlib.Path, *,
                 allow_config_change: bool = False) -> dict[str, Any]:
  """Runs the stages in order, skipping finished ones; writes a pipeline report.md.

  Args:
    config: the pipeline config (`stages` and one config per stage).
    workdir: the pipeline root; stage NAME runs in `workdir/NAME`.
    allow_config_change: let changed stages resume (see the module docstring).
  """
  workdir = pathlib.Path(workdir).absolute()
  stages = list(config.stages)
  for name in stages:
    if name not in config:
      raise config_lib.ConfigError(
          f"stage {name!r} is listed in config.stages but config.{name} is missing; "
          f"stages present: {[k for k in config if k != 'stages']}")
  with trainer.hold_workdir(workdir):
    changes = check_pipeline_config(config, workdir, allow=allow_config_change)
    preflight(config, workdir)
    if changes and jax.process_index() == 0:
      print(f"The pipeline config differs from {workdir / 'config.json'} (recorded in "
            f"{workdir_lib.HISTORY_NAME}):\n{workdir_lib.format_changes(changes)}")
    results: dict[str, Any] = {}
    written = False

    def write_root():  # once a stage has passed its own checks (it wrote its config.json)
      nonlocal written
      if not written and any((workdir / s / "config.json").exists() for s in stages):
        trainer.write_config(config, workdir, changes)
        written = True

    try:
      for i, name in enumerate(stages):
        stage_dir = workdir / name
        stage_cfg = resolve_stage_refs(config[name], workdir, stages[:i])
        if (stage_dir / "done.json").exists():
          # Paths from stage: references may differ when the pipeline folder was moved;
          # the references themselves were compared in the root config.
          ignore = workdir_lib.derived_keys(stage_cfg) + _stage_ref_keys(config[name])
          workdir_lib.check_config(stage_dir, stage_cfg, finished=True, resume_step=None,
                                   allow=False, ignore=ignore)
          print(f"[pipeline] stage {i + 1}/{len(stages)} '{name}': done, skipping")
          results[name] = json.loads((stage_dir / "done.json").read_text())
          continue
        print(f"[pipeline] stage {i + 1}/{len(stages)} '{name}' -> {stage_dir}")
        results[name] = trainer.train_and_evaluate(
            stage_cfg, stage_dir, allow_config_change=allow_config_change)
        write_root()
    finally:
      write_root()
    if jax.process_index() == 0:
      write_pipeline_report(workdir, stages, results,
                            compare=[tuple(p) for p in config.get("compare", ())],
                            labels=tuple(config.get("compare_labels", ())))
  return results


def write_pipeline_report(workdir: pathlib.Path, stages: list[str], results: dict[str, Any],
                          compare: list[tuple[str, str]] = (),
                          labels: tuple[str, ...] = ()) -> pathlib.Path:
  """WORKDIR/report.md: links to the stage reports, final metrics per stage, the
  comparisons of `compare` (pairs of stages; table + figures/comparison.png) and figures."""
  lines = ["# Pipeline report", "", "| stage | report |", "|---|---|"]
  lines += [f"| {s} | [{s}/report.md]({s}/report.md) |" for s in stages]
  if compare:
    lines += compare_section(workdir, results, compare, labels)
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


def _bounded(key: str, values: tuple[float, ...]) -> bool:
  """Metrics drawn in the comparison figure: scores in [0, 1] where higher is better
  (precision and recall are left to the table; f1 sums them up)."""
  skip = ("loss", "ece", "hd95", "error", "precision", "recall")
  return (all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in values)
          and not any(w in key for w in skip))


def compare_section(workdir: pathlib.Path, results: dict[str, Any],
                    compare: list[tuple[str, str]], labels: tuple[str, ...]) -> list[str]:
  """Markdown lines comparing pairs of stages on their common eval metrics, and a bar
  figure of the bounded ones (figures/comparison.png)."""
  first, second = labels or compare[0]
  lines = ["", "## Comparison", "",
           f"| task | metric | {first} | {second} | difference |", "|---|---|---|---|---|"]
  groups: dict[str, dict[str, tuple[float, float]]] = {}
  for a, b in compare:
    ha, hb = _headline(results.get(a, {})), _headline(results.get(b, {}))
    for key in [k for k in ha if k in hb and not k.endswith("_excluded")]:
      va, vb = ha[key], hb[key]
      if not (isinstance(va, (int, float)) and isinstance(vb, (int, float))):
        continue
      name = key.removeprefix("eval/")
      lines.append(f"| {a} vs {b} | {name} | {report_lib.fmt(va)} | {report_lib.fmt(vb)} | "
                   f"{va - vb:+.4g} |")
      if _bounded(key, (va, vb)):
        groups.setdefault(f"{a} vs {b}", {})[name] = (va, vb)
  if groups:
    from medrep_jax.eval import figures  # pylint: disable=g-import-not-at-top
    figures.paired_bar_figure(groups, (first, second), workdir / "figures" / "comparison.png",
                              ylabel="score (higher is better)")
    lines += ["", "![comparison](figures/comparison.png)"]
  return lines


def _headline(result: dict[str, Any]) -> dict[str, Any]:
  """A stage's eval metrics, or all its numbers for a stage that does not train."""
  evals = {k: v for k, v in result.items() if k.startswith("eval/")}
  return evals or {k: v for k, v in result.items() if isinstance(v, (int, float))}
