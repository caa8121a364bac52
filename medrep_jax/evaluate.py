"""Scores a finished run on any dataset the data layer reads, without training.

    python -m medrep_jax.evaluate --workdir runs/ft_seg \
        --config.data.name=image_mask_folder --config.data.root=/data/hospital_b \
        [--split test] [--name hospital_b]

Loads the run's config.json, applies `--config.data.*` (and `train.eval_batch_size`,
`train.max_eval_examples`) overrides, restores the run's saved state and runs the
trainer's own evaluation (`Trainer.evaluate(state, final=True)`): the same eval step,
metrics and figures as at the end of training. Writes RUN/eval_<name>/metrics.json,
figures/, metrics.jsonl and report.md.

A new `data.name` starts from that dataset's preset, but keeps the run's preprocessing and
label space (image size, channels, normalization, HU window, classes), which the model was
trained with; `--config.data.<field>=...` overrides any of them.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Sequence

import numpy as np

from medrep_jax import config_lib
from medrep_jax import errors
from medrep_jax.config_lib import ConfigError


# Overridable config fields: a prefix ending in "." covers a whole section.
ALLOWED = ("data.", "train.eval_batch_size", "train.max_eval_examples")
# Data fields the model was trained with; a new data.name keeps the run's values.
KEEP_FROM_RUN = ("image_size", "channels", "normalize", "num_classes", "class_names",
                 "num_mask_classes", "window_level", "window_width")


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
  """{"data.root": "/x", ...} from `--config.data.root=/x` (or `--config.data.root /x`)."""
  out, args = {}, list(args)
  while args:
    arg = args.pop(0)
    if not arg.startswith("--config."):
      raise ConfigError(f"unknown argument {arg!r}; config overrides look like "
                        f"--config.data.root=/path")
    key, eq, value = arg[len("--config."):].partition("=")
    if not eq:
      if not args:
        raise ConfigError(f"{arg} needs a value")
      value = args.pop(0)
    out[key] = config_lib.parse_value(value)
  return out


def _check_allowed(key: str) -> None:
  if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED):
    raise ConfigError(
        f"--config.{key} cannot be changed when evaluating a finished run: the model, its "
        f"training and its preprocessing are fixed. Only data.* fields, "
        f"train.eval_batch_size and train.max_eval_examples can be overridden (and the "
        f"split with --split)")


def _set(section, field: str, value: Any, key: str) -> None:
  if field not in section:
    hint = difflib.get_close_matches(field, list(section.keys()), n=3)
    hint = f" Did you mean {', '.join(map(repr, hint))}?" if hint else ""
    raise ConfigError(f"--config.{key}: unknown field {field!r}.{hint}")
  old = section[field]
  if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
    value = type(old)(value)
  try:
    section[field] = value
  except TypeError as e:
    raise ConfigError(f"--config.{key}={value!r}: expected a value like {old!r} ({e})") from e


def eval_config(run_config, overrides: dict[str, Any], split: str | None = None):
  """The run's config with the evaluation data and split (a new, unlocked ConfigDict)."""
  from medrep_jax.data import registry  # pylint: disable=g-import-not-at-top
  config = type(run_config)(config_lib.to_dict(run_config))
  for key in overrides:
    _check_allowed(key)
  name = overrides.get("data.name")
  if name is not None and name != config.data.name:
    data = registry.data_config(str(name))
    for field in KEEP_FROM_RUN:
      if field in config.data:
        data[field] = config.data[field]
    config.data = data
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    _set(_section(config, section), field, value, key)
  if split:
    config.train.eval_split = str(split)
  moved = {k: v for k, v in overrides.items() if k in ("data.name", "data.root")}
  if "data_info" in config and any(v != run_config.data.get(k.split(".")[1])
                                   for k, v in moved.items()):
    # Other data describes itself (with the run's KEEP_FROM_RUN fields); a model that does
    # not fit it then fails on restore, naming the array.
    del config["data_info"]
  return config


def _section(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.ndarray, np.generic)):
    return v.tolist()
  return v


def evaluate_run(workdir: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                 split: str | None = None, name: str | None = None) -> dict[str, Any]:
  """Evaluates the run in `workdir` on `overrides`' data; returns {"step", "eval/...": ...}.

  Writes `workdir/eval_<name>/` (metrics.json, metrics.jsonl, figures/, report.md);
  `name` defaults to `<data.name>_<split>`.

  Raises:
    FileNotFoundError: `workdir` is not a run directory or has no checkpoint.
    ConfigError: an override that is not allowed or names an unknown field.
    ValueError / DataError: the data cannot be read or does not fit the model.
  """
  from medrep_jax import methods  # pylint: disable=g-import-not-at-top
  from medrep_jax.core import runs  # pylint: disable=g-import-not-at-top
  from medrep_jax.methods import base  # pylint: disable=g-import-not-at-top

  run = runs.load_run(workdir)
  config = eval_config(run.config, dict(overrides or {}), split)
  stage = methods.load_method(config)
  if not isinstance(stage, base.Method):
    raise ValueError(f"{run.path} is a {config.method} stage {config.get('stage', '')!r} "
                     f"run, which trains no model: there is nothing to evaluate")
  split = str(config.train.eval_split)
  stage.make_source(split)  # checks the data before anything is written
  name = name or f"{config.data.name}_{split}"
  out_dir = run.path / f"eval_{name}"
  created = not out_dir.exists()
  try:
    return _evaluate_into(out_dir, config, stage, run)
  except BaseException:
    if created:  # a failed evaluation leaves no half-written folder behind
      shutil.rmtree(out_dir, ignore_errors=True)
    raise


def _evaluate_into(out_dir: pathlib.Path, config, stage, run) -> dict[str, Any]:
  """Restores the run's state into a trainer on `config` and writes its evaluation."""
  import jax  # pylint: disable=g-import-not-at-top
  from medrep_jax.train import report as report_lib  # pylint: disable=g-import-not-at-top
  from medrep_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  split = str(config.train.eval_split)
  out_dir.mkdir(parents=True, exist_ok=True)
  for stale in ("metrics.jsonl", "tb", "figures"):  # a re-run starts clean
    path = out_dir / stale
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)
  trainer = trainer_lib.Trainer(config, out_dir, stage)
  try:
    with jax.set_mesh(trainer.mesh):
      state = restore_state(trainer, run)
      trainer.figures, trainer.report_lines = {}, []
      metrics = trainer.evaluate(state, final=True)
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  _remove_if_empty(out_dir / "checkpoints")
  final = {"step": int(state.step),
           **{f"eval/{k}": _jsonable(v) for k, v in metrics.items()}}
  trainer_lib.write_config(config, out_dir)
  (out_dir / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
  lines = [f"Evaluation of the run in `{run.path}` (step {final['step']}) on data "
           f"`{config.data.name}` split `{split}`, without training."]
  report = report_lib.write_report(out_dir, config, final, trainer.figures,
                                   lines + list(trainer.report_lines))
  return {**final, "report": str(report)}


def restore_state(trainer, run):
  """The run's saved arrays in the structure and shardings `trainer` builds for its config.

  Params, model state, extras and step come from the checkpoint; the optimizer state is
  left as initialized (evaluation does not use it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from medrep_jax.core import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from medrep_jax.core import state as state_lib  # pylint: disable=g-import-not-at-top
  from medrep_jax.data import loader  # pylint: disable=g-import-not-at-top
  tc = trainer.config.train
  method = trainer.method
  batch = next(iter(loader.eval_batches(
      method.make_source(tc.eval_split), method.transforms(tc.eval_split),
      global_batch=int(tc.eval_batch_size), max_examples=int(tc.eval_batch_size),
      num_threads=int(tc.num_threads))))
  batch.pop("_valid")
  state = trainer.build_state(mesh_lib.to_global(batch, trainer.mesh))
  target = state_lib.state_dict(state)
  saved = dict(run.state)
  for key in ("params", "model_state", "extras"):
    _check_shapes(target.get(key, {}), saved.get(key, {}), key, run.path)
  restored = {**target, **{k: saved[k] for k in ("step", "params", "model_state", "extras")
                           if k in saved}}
  state = state_lib.from_state_dict(state, jax.device_get(restored))
  return jax.device_put(state, trainer.state_sharding)


def _check_shapes(target: Any, saved: Any, where: str, path: pathlib.Path) -> None:
  """Names the first array whose saved shape differs from what the config builds."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat_t = traverse_util.flatten_dict(target, sep="/") if isinstance(target, dict) else {}
  flat_s = traverse_util.flatten_dict(saved, sep="/") if isinstance(saved, dict) else {}
  for key, value in flat_t.items():
    if key not in flat_s:
      raise ValueError(f"{where}/{key} is not in the checkpoint of {path}: the evaluation "
                       f"config builds another model than the run trained")
    want, got = tuple(np.shape(value)), tuple(np.shape(flat_s[key]))
    if want != got:
      raise ValueError(
          f"{where}/{key} has shape {got} in the checkpoint of {path}, but the evaluation "
          f"data builds {want}: evaluate on data with the run's classes and channels "
          f"(data.num_classes, data.num_mask_classes, data.channels)")


def _remove_if_empty(path: pathlib.Path) -> None:
  if path.is_dir() and not any(path.iterdir()):
    path.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m medrep_jax.evaluate", description=__doc__.split("\n\n")[0],
      epilog="Any other argument is a config override: --config.data.FIELD=VALUE, "
             "--config.train.eval_batch_size=N, --config.train.max_eval_examples=N.")
  parser.add_argument("--workdir", required=True, help="the finished run to evaluate")
  parser.add_argument("--split", default=None, help="data split (default: the run's "
                      "train.eval_split)")
  parser.add_argument("--name", default=None, help="output folder eval_<name> "
                      "(default: <data.name>_<split>)")
  errors.add_debug_flag(parser)
  errors.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)
  final = evaluate_run(args.workdir, parse_overrides(rest), split=args.split,
                       name=args.name)
  for k, v in final.items():
    if isinstance(v, float):
      print(f"{k}: {v:.4g}")
  print(f"Report: {final['report']}")
  return 0


def run() -> None:
  errors.command(main)  # one-paragraph errors (exit 2), SIGTERM message (exit 143)


if __name__ == "__main__":
  run()
