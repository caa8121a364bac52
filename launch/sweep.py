"""Hyperparameter sweeps: expand, launch, aggregate.

    python -m launch.sweep --config configs/finetune.py:size=tiny \
        --sweep 'optim.lr=[1e-3,1e-4],seed=[0,1,2]' --workdir runs/sweep_lr \
        [--run print|local] [--submit slurm [--sbatch '--nodes=2']] \
        [--extra '--config.train.num_steps=500'] [--aggregate] \
        [--select-by eval/accuracy [--select-mode auto|max|min] [--select-over optim.lr] \
         [--test-split test]]
    python -m launch.sweep aggregate runs/sweep_lr [--metrics 'eval/*,train/loss']
    python -m launch.sweep select runs/sweep_lr [--by eval/accuracy] [--mode auto|max|min] \
        [--over optim.lr] [--test-split test] [--test run|print|skip]

The sweep is the cartesian product of the listed values. Each run gets its own workdir,
ROOT/<key=value,...> (characters other than letters, digits and `._+=,@-` become `_`).
Keys of the config file's DEFAULTS are variant args (after the ':'); other keys are
`--config.` overrides and must exist in the config; a `config.` prefix forces an override
(see launch/sweep_spec.py). All runs are validated before anything is printed or started.

`--run print` (the default) prints one `python -m medrep_jax.main` command per run; `--run
local` runs them one after another here (skipping finished runs; a re-run resumes);
`--submit slurm` submits each with `sbatch [--sbatch args] launch/slurm_gpu.sh`. Every mode
writes ROOT/sweep.json (keys, values, commands), which `aggregate` reads to write
ROOT/sweep.md, sweep.csv and, for keys named `seed`, mean ± std groups (sweep_groups.csv).

`--select-by METRIC` makes the sweep a grid search with selection on the validation split
(CAMContrast Appendix A, Table A.1; launch/sweep_select.py): every run must score its eval
metrics on the validation split (checked before anything runs); after a local run the best
point is chosen on METRIC alone, the chosen run(s) are evaluated on `--test-split`, and
ROOT/selection.json plus a "Selection" section of sweep.md report the choice with its test
metrics. With `--run print` or `--submit slurm`, run `python -m launch.sweep select ROOT`
once the runs have finished (it reads the settings from sweep.json).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil
import subprocess
import sys

from launch import sweep_select, sweep_spec, sweep_table

SLURM_SCRIPT = pathlib.Path(__file__).with_name("slurm_gpu.sh")


def _expand_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="FILE[:variant args], as for medrep_jax.main")
  p.add_argument("--sweep", required=True, help="'key=[v1,v2],key2=[a,b]' (cartesian product)")
  p.add_argument("--workdir", required=True, type=pathlib.Path, help="sweep root folder")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--run", choices=("print", "local"), default="print",
                    help="print the commands (default) or run them here, one by one")
  mode.add_argument("--submit", choices=("slurm",), help="submit each run with sbatch")
  p.add_argument("--extra", default="", help="more medrep_jax.main flags for every run, "
                 "e.g. '--config.train.num_steps=500'")
  p.add_argument("--sbatch", default="", help="options for sbatch, e.g. '--nodes=2'")
  p.add_argument("--aggregate", action="store_true",
                 help="aggregate the sweep's metrics after running it")
  p.add_argument("--select-by", default="", metavar="METRIC",
                 help="grid search: choose the best run on this validation metric "
                      "(eval/<name>, or <stage>/eval/<name>), then test it")
  _selection_args(p, "--select-")
  return p


def _selection_args(p: argparse.ArgumentParser, prefix: str) -> None:
  """The selection options (`--select-mode` ... on a sweep, `--mode` ... on `select`)."""
  p.add_argument(f"{prefix}mode", choices=sweep_select.MODES, default=None,
                 help="maximize or minimize the metric (auto: minimize losses, HD95, ECE, "
                      "errors; maximize the rest)")
  p.add_argument(f"{prefix}over", default=None, metavar="KEYS",
                 help="comma-separated sweep keys to choose among (default: every non-seed "
                      "key; the other non-seed keys get one choice each)")
  p.add_argument("--test-split", default=None,
                 help="the held-out split the chosen runs are evaluated on (default test)")


def _select_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep select",
                              description=sweep_select.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("root", type=pathlib.Path, help="the sweep's --workdir")
  p.add_argument("--by", default=None, metavar="METRIC",
                 help="the validation metric (default: the sweep's --select-by)")
  _selection_args(p, "--")
  p.add_argument("--test", choices=sweep_select.TEST_ACTIONS, default="run",
                 help="evaluate the chosen runs on the test split (run), print those "
                      "commands (print) or neither (skip)")
  return p


def _selection_settings(stored: dict, by, mode, over, test_split) -> dict:
  """The selection settings: the given ones, else sweep.json's, else the defaults."""
  out = dict(by=by or stored.get("by", ""), mode=mode or stored.get("mode", "auto"),
             over=over if over is not None else stored.get("over"),
             test_split=test_split or stored.get("test_split", "test"))
  if isinstance(out["over"], str):
    out["over"] = [k.strip() for k in out["over"].split(",") if k.strip()]
  return out


def run_selection(root: pathlib.Path, settings: dict, test: str = "run") -> int:
  """Selects, aggregates and prints the selection; 0, or 1 when no selection is possible."""
  try:
    selection = sweep_select.select(root, settings["by"], mode=settings["mode"],
                                    over=settings["over"] or None,
                                    test_split=settings["test_split"], test=test)
  except (sweep_select.SelectError, FileNotFoundError) as e:
    print(f"sweep select: {e}", file=sys.stderr)
    return 1
  sweep_table.aggregate(root)
  print("\n".join(sweep_table.render_selection(selection)).strip())
  return 0


def _aggregate_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep aggregate")
  p.add_argument("root", type=pathlib.Path, help="the sweep's --workdir")
  p.add_argument("--metrics", default=",".join(sweep_table.DEFAULT_COLUMNS),
                 help="comma-separated globs of the metrics to tabulate in sweep.md")
  return p


def commands(args, runs: list[sweep_spec.Run]) -> list[list[str]]:
  """One argv per run, for the chosen mode."""
  extra = sweep_spec.split_extra(args.extra)
  out = []
  for run in runs:
    workdir = args.workdir / run.name
    if args.submit == "slurm":
      # slurm_gpu.sh takes CONFIG WORKDIR [flags...] and adds --distributed itself.
      out.append(["sbatch", f"--job-name=sweep-{run.name}"[:128],
                  *sweep_spec.split_extra(args.sbatch), str(SLURM_SCRIPT),
                  run.config_arg, str(workdir), *run.overrides, *extra])
    else:
      python = sys.executable if args.run == "local" else "python"
      out.append([python, "-m", "medrep_jax.main",
                  *sweep_spec.main_args(run, workdir, extra)])
  return out


def _write_spec(args, runs, cmds, selection: dict | None = None) -> None:
  args.workdir.mkdir(parents=True, exist_ok=True)
  keys = list(runs[0].values) if runs else []
  spec = dict(config=args.config, sweep=args.sweep, extra=args.extra, keys=keys,
              runs=[dict(name=r.name, values=r.values, command=shlex.join(c))
                    for r, c in zip(runs, cmds)])
  if selection:
    spec["select"] = selection
  (args.workdir / sweep_table.SPEC_FILE).write_text(json.dumps(spec, indent=2, default=list))


def _launch(args, runs, cmds) -> int:
  if args.submit and not shutil.which("sbatch"):
    print("sweep: sbatch not found on this machine; run the sweep where SLURM is, or use "
          "--run print to see the commands", file=sys.stderr)
    return 2
  failed = []
  for i, (run, cmd) in enumerate(zip(runs, cmds), 1):
    status, _ = sweep_table.run_metrics(args.workdir / run.name)
    if status == "done":
      print(f"[sweep {i}/{len(runs)}] {run.name}: done, skipping", flush=True)
      continue
    print(f"[sweep {i}/{len(runs)}] {run.name}: {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode:
      failed.append(run.name)
  if failed:
    print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


def _join_dash_values(argv: list[str]) -> list[str]:
  """`--extra '--config.a=1'` -> `--extra=--config.a=1` (argparse reads a value that starts
  with '-' as an option)."""
  out, i = [], 0
  while i < len(argv):
    if argv[i] in ("--extra", "--sbatch") and i + 1 < len(argv):
      out.append(f"{argv[i]}={argv[i + 1]}")
      i += 2
    else:
      out.append(argv[i])
      i += 1
  return out


def main(argv: list[str] | None = None) -> int:
  argv = _join_dash_values(sys.argv[1:] if argv is None else list(argv))
  if argv[:1] == ["select"]:
    a = _select_parser().parse_args(argv[1:])
    spec = a.root / sweep_table.SPEC_FILE
    stored = json.loads(spec.read_text()).get("select", {}) if spec.exists() else {}
    settings = _selection_settings(stored, a.by, a.mode, a.over, a.test_split)
    if not settings["by"]:
      print("sweep select: name the validation metric with --by (the sweep was not "
            "launched with --select-by)", file=sys.stderr)
      return 2
    return run_selection(a.root, settings, a.test)
  if argv[:1] == ["aggregate"]:
    a = _aggregate_parser().parse_args(argv[1:])
    try:
      print(sweep_table.aggregate(a.root, tuple(m.strip() for m in a.metrics.split(","))))
    except FileNotFoundError as e:
      print(f"sweep aggregate: {e}", file=sys.stderr)
      return 2
    return 0
  args = _expand_parser().parse_args(argv)
  settings, check = None, None
  if args.select_by:
    settings = _selection_settings({}, args.select_by, args.select_mode, args.select_over,
                                   args.test_split)
    check = lambda config: sweep_select.check_config(config, settings["by"],
                                                      settings["test_split"])
  elif args.select_mode or args.select_over or args.test_split:
    print("sweep: --select-mode, --select-over and --test-split need --select-by",
          file=sys.stderr)
    return 2
  try:
    if settings:
      sweep_select.split_metric(settings["by"])
    runs = sweep_spec.expand(args.config, args.sweep, sweep_spec.split_extra(args.extra),
                             check=check)
  except (sweep_spec.SweepError, sweep_select.SelectError) as e:
    print(f"sweep: {e}", file=sys.stderr)
    return 2
  cmds = commands(args, runs)
  _write_spec(args, runs, cmds, settings)
  if args.run == "print" and not args.submit:
    print("\n".join(shlex.join(c) for c in cmds))
    rc = 0
  else:
    rc = _launch(args, runs, cmds)
  if settings and args.run == "local" and not args.submit:
    rc = max(rc, run_selection(args.workdir, settings))
  elif settings:
    print(f"# once the runs have finished: python -m launch.sweep select {args.workdir}")
  if args.aggregate:
    print(sweep_table.aggregate(args.workdir))
  return rc


if __name__ == "__main__":
  sys.exit(main())
