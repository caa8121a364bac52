"""Grid selection: the best point of a sweep on a validation metric, scored on the test split.

The CAMContrast downstream protocol (Yap & Ng, Appendix A and Table A.1) searches the
learning rate of every task over a grid, "selecting the optimal parameters on the
validation set", and reports the hold-out test set. For a stage that trains a whole
network (U-Net segmentation transfer), each grid point is one run of the sweep:

    python -m launch.sweep --config configs/finetune.py:task=segmentation,protocol=camcontrast \
        --sweep 'optim.lr=[1e-3,3e-3,1e-2,3e-2,1e-1]' --workdir runs/siim_lr --run local \
        --select-by eval/dice
    python -m launch.sweep select runs/siim_lr [--by eval/dice] [--mode auto|max|min] \
        [--over optim.lr] [--test-split test] [--test run|print|skip]

What is read, and where from:

- The choice reads one number per run: `--select-by` (`eval/<name>`, or `<stage>/eval/<name>`
  for a pipeline run) from the run's final metrics (done.json). Those are the metrics of the
  run's `train.eval_split`, which must not be the test split: every run's config.json is
  checked (and the sweep checks its configs before anything runs).
- Only then are the chosen runs evaluated on `--test-split` (`python -m medrep_jax.evaluate
  --workdir RUN --split test --name test`, which writes RUN/eval_test/metrics.json); the
  choice never reads those files, so the test split cannot change it.

Candidates and groups: a candidate is one combination of the `--over` keys (default: every
swept key except seeds). Runs that differ only in a `seed` key are one candidate, scored
by the mean over its finished seeds. Keys neither in `--over` nor seeds split the sweep
into independent selections (e.g. one learning rate per `init_from`, as the paper searches
per initialization). Direction: `--mode auto` maximizes unless the metric's name says
lower is better (`LOWER_IS_BETTER`: loss, HD95, ECE, errors). Ties go to the candidate
that comes first in the sweep's order (the order of the values in `--sweep`), so a grid
listed from the smallest learning rate up prefers the smaller one. Runs without done.json
or with a non-finite metric (a diverged learning rate) are not candidates; they are listed.

Deviation: the paper retrains the chosen setting on train + validation before testing; here
the chosen run itself is tested (no retraining), as the issue's protocol asks.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

from launch import sweep_table

SELECTION_FILE = sweep_table.SELECTION_FILE
MODES = ("auto", "max", "min")
TEST_ACTIONS = ("run", "print", "skip")
# Name parts (split on _ - .) of metrics where lower is better, for --mode auto.
LOWER_IS_BETTER = ("loss", "hd95", "hd", "ece", "error", "err", "mse", "mae", "nll", "fd",
                   "kid", "distance")


class SelectError(ValueError):
  """A selection cannot be made (bad metric, a run scored on the test split, no finished
  run)."""


def split_metric(metric: str) -> tuple[str, str]:
  """`eval/dice` -> ("", "dice"); `finetune_seg/eval/dice` -> ("finetune_seg", "dice")."""
  parts = metric.split("/")
  if len(parts) >= 2 and parts[0] == "eval":
    return "", "/".join(parts[1:])
  if len(parts) >= 3 and parts[1] == "eval":
    return parts[0], "/".join(parts[2:])
  raise SelectError(f"--select-by {metric!r} is not an evaluation metric: name one as "
                    f"eval/<name> (or <stage>/eval/<name> in a pipeline), e.g. eval/dice")


def direction(metric: str, mode: str = "auto") -> str:
  """"max" or "min": `mode`, or for "auto" the metric name's rule (LOWER_IS_BETTER)."""
  if mode not in MODES:
    raise SelectError(f"--select-mode {mode!r}; expected one of {MODES}")
  if mode != "auto":
    return mode
  words = re.split(r"[_\-.]", metric.rsplit("/", 1)[-1].lower())
  return "min" if any(w in LOWER_IS_BETTER for w in words) else "max"


def _eval_split(config: dict, stage: str, where: str) -> str:
  section = config.get(stage) if stage else config
  if not isinstance(section, dict) or "train" not in section:
    raise SelectError(f"{where}: no {'stage ' + repr(stage) + ' with ' if stage else ''}"
                      f"train.eval_split to tell which split the metric was scored on")
  return str(section["train"].get("eval_split", "val"))


def check_config(config: Any, metric: str, test_split: str = "test") -> None:
  """Up-front check of one sweep run's resolved config: `metric` names an eval metric and
  its stage scores the eval split, not `test_split`."""
  stage, _ = split_metric(metric)
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  split = _eval_split(config, stage, "the sweep's config")
  if split == test_split:
    where = f"{stage}.train.eval_split" if stage else "train.eval_split"
    raise SelectError(f"selecting on {metric} would read the test split: {where}="
                      f"{split!r}. Score the runs on the validation split (drop "
                      f"--config.{where}={split} or set it to val); the chosen run is then "
                      f"evaluated on {test_split!r}")


def run_eval_split(run_dir: pathlib.Path, metric: str) -> str:
  """The split `metric` was scored on: train.eval_split of the config.json in `run_dir`
  (the run's folder, or its stage's folder for a `<stage>/eval/...` metric)."""
  path = run_dir / "config.json"
  if not path.exists():
    raise SelectError(f"{path} is missing: cannot tell which split {metric} was scored on")
  return _eval_split(json.loads(path.read_text()), "", str(path))


def over_keys(keys: Sequence[str], over: Sequence[str] | None) -> list[str]:
  """The keys chosen among: `over`, checked against the sweep's keys, or every non-seed key."""
  if not over:
    return [k for k in keys if not sweep_table.is_seed_key(k)]
  unknown = [k for k in over if k not in keys]
  if unknown:
    raise SelectError(f"--select-over {unknown} are not keys of the sweep ({list(keys)})")
  return list(over)


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def choose(root: str | pathlib.Path, by: str, *, mode: str = "auto",
           over: Sequence[str] | None = None, test_split: str = "test") -> list[dict]:
  """The best candidate of every selection group, from the runs' validation metrics only.

  Args:
    root: the sweep's --workdir (sweep.json, or run folders named key=value,...).
    by: the metric to select on (`eval/<name>` or `<stage>/eval/<name>`).
    mode: "max", "min" or "auto" (see `direction`).
    over: the sweep keys chosen among; default every key except seeds.
    test_split: the split the runs must not have been scored on.

  Returns:
    One dict per group, in sweep order: fixed (values of the other keys), chosen (values
    of the `over` keys), score, runs (the chosen runs), candidates ([{values, score, n,
    runs}] in sweep order, score None when no run of it finished with a finite metric)
    and skipped (runs not finished, or without a finite metric).

  Raises:
    SelectError: a bad key or metric, a run scored on `test_split`, or a group with no
      finished run.
  """
  root = pathlib.Path(root)
  stage, _ = split_metric(by)
  best_of = max if direction(by, mode) == "max" else min
  keys, rows = sweep_table.collect(root)
  over = over_keys(keys, over)
  fixed = [k for k in keys if k not in over and not sweep_table.is_seed_key(k)]
  groups: dict[str, dict] = {}
  for row in rows:
    ident = json.dumps([row["values"].get(k) for k in fixed], default=str)
    group = groups.setdefault(ident, dict(fixed={k: row["values"].get(k) for k in fixed},
                                          candidates={}, skipped=[]))
    cand = json.dumps([row["values"].get(k) for k in over], default=str)
    cand = group["candidates"].setdefault(cand, dict(
        values={k: row["values"].get(k) for k in over}, scores=[], runs=[]))
    value = row["metrics"].get(by)
    if row["status"] != "done" or not _finite(value):
      group["skipped"].append(row["name"])
      continue
    run_dir = root / row["name"] / stage if stage else root / row["name"]
    split = run_eval_split(run_dir, by)
    if split == test_split:
      raise SelectError(f"run {row['name']} scored {by} on the {split!r} split "
                        f"(train.eval_split in {run_dir / 'config.json'}); selecting on it "
                        f"would use the test split. Re-run the sweep scored on val")
    cand["scores"].append(float(value))
    cand["runs"].append(row["name"])
  out = []
  for group in groups.values():
    cands = [dict(values=c["values"], runs=c["runs"], n=len(c["scores"]),
                  score=float(np.mean(c["scores"])) if c["scores"] else None)
             for c in group["candidates"].values()]
    scored = [c for c in cands if c["score"] is not None]
    if not scored:
      raise SelectError(f"no finished run with a finite {by} in the group "
                        f"{group['fixed'] or 'of the whole sweep'} under {root}")
    best = best_of(c["score"] for c in scored)
    chosen = next(c for c in scored if c["score"] == best)  # first in sweep order
    out.append(dict(fixed=group["fixed"], chosen=chosen["values"], score=chosen["score"],
                    runs=chosen["runs"], candidates=cands, skipped=group["skipped"]))
  return out


def heldout_dir(run_dir: pathlib.Path, test_split: str) -> pathlib.Path:
  """Where `medrep_jax.evaluate --name <test_split>` writes a run's test evaluation."""
  return run_dir / f"eval_{test_split}"


def heldout_commands(root: pathlib.Path, choices: list[dict], by: str, test_split: str,
                  python: str = sys.executable) -> list[list[str]]:
  """`medrep_jax.evaluate` commands for the chosen runs not yet scored on `test_split`."""
  stage, _ = split_metric(by)
  out = []
  for choice in choices:
    for name in choice["runs"]:
      run_dir = root / name / stage if stage else root / name
      if not (heldout_dir(run_dir, test_split) / "metrics.json").exists():
        out.append([python, "-m", "medrep_jax.evaluate", "--workdir", str(run_dir),
                    "--split", test_split, "--name", test_split])
  return out


def heldout_metrics(root: pathlib.Path, choice: dict, by: str, test_split: str
                 ) -> dict[str, tuple[float, float, int]]:
  """{eval metric: (mean, std (ddof 1), n)} of the chosen runs' test evaluations."""
  stage, _ = split_metric(by)
  prefix = f"{stage}/" if stage else ""
  values: dict[str, list[float]] = {}
  for name in choice["runs"]:
    run_dir = root / name / stage if stage else root / name
    path = heldout_dir(run_dir, test_split) / "metrics.json"
    if path.exists():
      for key, value in json.loads(path.read_text()).items():
        if key.startswith("eval/") and _finite(value):
          values.setdefault(prefix + key, []).append(float(value))
  return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
          for k, v in sorted(values.items())}


def select(root: str | pathlib.Path, by: str, *, mode: str = "auto",
           over: Sequence[str] | None = None, test_split: str = "test", test: str = "run",
           python: str = sys.executable) -> dict:
  """Chooses (`choose`), scores the chosen runs on `test_split`, writes ROOT/selection.json.

  Args:
    test: "run" evaluates the chosen runs that have no test evaluation yet (one
      `medrep_jax.evaluate` process each), "print" prints those commands, "skip" neither;
      test metrics already on disk are reported either way.

  Returns:
    The selection written to selection.json: by, mode (the direction used), over,
    test_split and choices (each with its `test` metrics).
  """
  if test not in TEST_ACTIONS:
    raise SelectError(f"--test {test!r}; expected one of {TEST_ACTIONS}")
  root = pathlib.Path(root)
  choices = choose(root, by, mode=mode, over=over, test_split=test_split)
  for cmd in heldout_commands(root, choices, by, test_split, python):
    if test == "print":
      print(shlex.join(cmd))
    elif test == "run":
      print(f"[select] test evaluation: {shlex.join(cmd)}", flush=True)
      if subprocess.run(cmd).returncode:
        raise SelectError(f"the test evaluation failed: {shlex.join(cmd)}")
  for choice in choices:
    choice["test"] = heldout_metrics(root, choice, by, test_split)
  keys, _ = sweep_table.collect(root)
  selection = dict(by=by, mode=direction(by, mode), over=over_keys(keys, over),
                   test_split=test_split, choices=choices)
  (root / SELECTION_FILE).write_text(json.dumps(selection, indent=2, default=str))
  return selection
