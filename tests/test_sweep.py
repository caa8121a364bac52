"""launch.sweep: parsing, validation, expansion, run names, launch modes and aggregation."""
import csv
import json
import re
import shlex
import shutil

import numpy as np
import pytest

from launch import sweep, sweep_select, sweep_spec, sweep_table

from conftest import REPO_ROOT

FINETUNE = f"{REPO_ROOT / 'configs' / 'finetune.py'}:size=tiny"


def test_parse_sweep_lists_scalars_and_tuples():
  parsed = sweep_spec.parse_sweep(
      'a.b=[1,2], c=[x,y] ,d=0.5,e=[(1,2),(3, 4)],f=["u,v"],g=[True]')
  assert [k for k, _, _ in parsed] == ["a.b", "c", "d", "e", "f", "g"]
  values = {k: v for k, v, _ in parsed}
  assert values == {"a.b": [1, 2], "c": ["x", "y"], "d": [0.5], "e": [(1, 2), (3, 4)],
                    "f": ["u,v"], "g": [True]}
  texts = {k: t for k, _, t in parsed}
  assert texts["e"] == ["(1,2)", "(3, 4)"] and texts["f"] == ["u,v"]


@pytest.mark.parametrize("spec,match", [("a", "not key="), ("a=[]", "no values"),
                                        ("a=[1],a=[2]", "repeated"),
                                        ("a=[1,2", "unclosed"), ("a=1]", "unbalanced")])
def test_parse_sweep_errors(spec, match):
  with pytest.raises(sweep_spec.SweepError, match=match):
    sweep_spec.parse_sweep(spec)


def test_expand_is_the_product_of_variant_args_and_overrides():
  runs = sweep_spec.expand(FINETUNE, "seed=[0,1],optim.lr=[0.1,1e-2],config.seed=[7]",
                           ["--config.train.num_steps=5"])
  assert len(runs) == 4
  assert [r.values for r in runs] == [
      {"seed": s, "optim.lr": lr, "config.seed": 7} for s in (0, 1) for lr in (0.1, 0.01)]
  first = runs[1]
  assert first.config_arg == FINETUNE + ",seed=0"  # a variant arg goes after the ':'
  assert first.overrides == ("--config.optim.lr=1e-2", "--config.seed=7")
  assert first.name == "seed=0,optim.lr=1e-2,config.seed=7"
  assert len({r.name for r in runs}) == 4
  args = sweep_spec.main_args(first, REPO_ROOT / "x", ["--config.train.num_steps=5"])
  assert args[:2] == [f"--config={first.config_arg}", f"--workdir={REPO_ROOT / 'x'}"]
  assert args[-1] == "--config.train.num_steps=5"


def test_sweep_value_replaces_a_variant_arg_of_the_config_arg():
  (run,) = sweep_spec.expand(FINETUNE + ",task=classification", "size=[paper]")
  assert run.config_arg.endswith(":size=paper,task=classification")


@pytest.mark.parametrize("spec,extra,match", [
    ("optim.lrr=[1,2]", [], "Did you mean 'optim.lr'"),
    ("lr=[1e-3]", [], "Did you mean 'optim.lr'"),
    ("sed=[1]", [], "Did you mean 'seed'"),
    ("task=[foo]", [], "task='foo'"),
    ("train.num_steps=[abc]", [], "num_steps"),
    ("seed=[1]", ["--config.train.nm_steps=3"], "Did you mean 'train.num_steps'"),
    ("task=['a,b']", [], "cannot take a value with ','"),
    ("optim.lr=[1,2]", ["--config.optim.lr=3"], "both swept and set in --extra"),
])
def test_invalid_keys_and_values_fail_up_front(spec, extra, match):
  with pytest.raises(sweep_spec.SweepError, match=match):
    sweep_spec.expand(FINETUNE, spec, extra)


def test_run_names_are_filesystem_safe_and_bounded():
  (run,) = sweep_spec.expand(FINETUNE, "init_from=[/tmp/my run]")
  assert run.name == "init_from=_tmp_my_run"
  long = "x" * 300
  (a,) = sweep_spec.expand(FINETUNE, f"init_from=[{long}]")
  (b,) = sweep_spec.expand(FINETUNE, f"init_from=[{long}y]")
  assert len(a.name) < 200 and a.name != b.name and "/" not in a.name


def test_print_mode_prints_commands_and_writes_the_spec(tmp_path, capsys):
  rc = sweep.main(["--config", FINETUNE, "--sweep", "optim.lr=[0.1,0.2]",
                   "--workdir", str(tmp_path), "--extra", "--config.train.num_steps=3"])
  assert rc == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("python -m medrep_jax.main --config=")
  assert "--config.optim.lr=0.1" in lines[0] and lines[0].endswith("num_steps=3")
  spec = json.loads((tmp_path / "sweep.json").read_text())
  assert spec["keys"] == ["optim.lr"] and len(spec["runs"]) == 2
  assert not any(p.is_dir() for p in tmp_path.iterdir())  # nothing ran


def test_unknown_key_exits_with_a_message(tmp_path, capsys):
  assert sweep.main(["--config", FINETUNE, "--sweep", "optim.lrr=[1]",
                     "--workdir", str(tmp_path)]) == 2
  assert "Did you mean 'optim.lr'" in capsys.readouterr().err


def test_submit_slurm_calls_sbatch_per_run(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sweep.shutil, "which", lambda name: f"/usr/bin/{name}")
  monkeypatch.setattr(sweep.subprocess, "run",
                      lambda cmd: calls.append(cmd) or type("R", (), {"returncode": 0}))
  rc = sweep.main(["--config", FINETUNE, "--sweep", "seed=[0,1]", "--workdir", str(tmp_path),
                   "--submit", "slurm", "--sbatch", "--nodes=2 --time=1:00:00",
                   "--extra", "--config.optim.lr=0.1"])
  assert rc == 0 and len(calls) == 2
  cmd = calls[1]
  assert cmd[:4] == ["sbatch", "--job-name=sweep-seed=1", "--nodes=2", "--time=1:00:00"]
  assert cmd[4].endswith("launch/slurm_gpu.sh")
  assert cmd[5:] == [FINETUNE + ",seed=1", str(tmp_path / "seed=1"), "--config.optim.lr=0.1"]


# ---------------------------------------------------------------------------- aggregation

ACC = {(lr, s): 0.5 + 10 * lr + 0.01 * s for lr in (0.1, 0.01) for s in (0, 1, 2)}


def _fake_sweep(root, with_spec=True):
  """2 lr x 3 seeds; (0.01, seed 2) has only a partial metrics.jsonl (still running)."""
  runs = []
  for (lr, s), acc in ACC.items():
    name = f"optim.lr={lr},seed={s}"
    d = root / name
    d.mkdir(parents=True)
    rows = [{"step": 10, "split": "train", "loss": 2.0 - lr},
            {"step": 20, "split": "train", "loss": 1.0 - lr},
            {"step": 20, "split": "eval", "eval/accuracy": acc}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if (lr, s) == (0.01, 2):
      text += '{"step": 30, "spl'  # a line being written
    else:
      (d / "done.json").write_text(json.dumps(
          {"step": 20, "train/loss": 1.0 - lr, "eval/accuracy": acc, "note": "x"}))
    (d / "metrics.jsonl").write_text(text)
    runs.append(dict(name=name, values={"optim.lr": lr, "seed": s}))
  (root / "empty").mkdir()  # not a run: ignored without sweep.json
  if with_spec:
    (root / "sweep.json").write_text(json.dumps(dict(keys=["optim.lr", "seed"], runs=runs)))


@pytest.mark.parametrize("with_spec", [True, False], ids=["sweep.json", "folder names"])
def test_aggregate_tables_runs_and_seed_groups(tmp_path, with_spec):
  _fake_sweep(tmp_path, with_spec)
  text = sweep_table.aggregate(tmp_path)
  with (tmp_path / "sweep.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  assert list(rows[0])[:4] == ["run", "optim.lr", "seed", "status"]
  by_run = {r["run"]: r for r in rows}
  assert by_run["optim.lr=0.01,seed=2"]["status"] == "running"
  assert float(by_run["optim.lr=0.01,seed=2"]["train/loss"]) == pytest.approx(0.99)
  assert float(by_run["optim.lr=0.1,seed=1"]["eval/accuracy"]) == pytest.approx(ACC[0.1, 1])
  with (tmp_path / "sweep_groups.csv").open() as f:
    groups = {float(g["optim.lr"]): g for g in csv.DictReader(f)}
  for lr in (0.1, 0.01):
    seeds = range(3) if lr == 0.1 else range(2)  # the running run is not in the mean
    accs = [ACC[lr, s] for s in seeds]
    assert int(groups[lr]["n"]) == len(accs)
    assert float(groups[lr]["eval/accuracy_mean"]) == pytest.approx(np.mean(accs))
    assert float(groups[lr]["eval/accuracy_std"]) == pytest.approx(np.std(accs, ddof=1))
  assert "## Mean ± std over seed" in text
  assert f"{np.mean([ACC[0.1, s] for s in range(3)]):.4g} ± 0.01" in text
  assert (tmp_path / "sweep.md").read_text() == text


def test_aggregate_pipeline_run_prefixes_stages(tmp_path):
  run = tmp_path / "seed=0"
  (run / "a").mkdir(parents=True)
  (run / "b").mkdir()
  (run / "config.json").write_text(json.dumps({"stages": ["a", "b"]}))
  (run / "a" / "done.json").write_text(json.dumps({"eval/accuracy": 0.75}))
  (run / "b" / "metrics.jsonl").write_text(
      json.dumps({"step": 3, "split": "eval", "eval/dice": 0.5}) + "\n")
  status, metrics = sweep_table.run_metrics(run)
  assert status == "running"
  assert metrics == {"a/eval/accuracy": 0.75, "b/eval/dice": 0.5, "b/step": 3}
  assert "a/eval/accuracy" in sweep_table.aggregate(tmp_path)


def test_aggregate_without_runs_fails_clearly(tmp_path, capsys):
  assert sweep.main(["aggregate", str(tmp_path)]) == 2
  assert "no sweep.json" in capsys.readouterr().err


@pytest.mark.slow
def test_local_sweep_of_two_tiny_runs(tmp_path, capsys):
  """Two real CLI runs (seeds 0 and 1), with gradient accumulation, then the table."""
  rc = sweep.main(["--config", FINETUNE, "--sweep", "seed=[0,1]", "--workdir", str(tmp_path),
                   "--run", "local", "--aggregate", "--extra",
                   "--config.optim.accumulate_steps=2 --config.train.progress=False "
                   "--config.data.num_examples=16 --config.train.max_eval_examples=8"])
  assert rc == 0
  for seed in (0, 1):
    config = json.loads((tmp_path / f"seed={seed}" / "config.json").read_text())
    assert config["seed"] == seed and config["optim"]["accumulate_steps"] == 2
  with (tmp_path / "sweep.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [r["status"] for r in rows] == ["done", "done"]
  assert rows[0]["eval/accuracy"] != ""
  assert "| 2 |" in (tmp_path / "sweep.md").read_text()  # one group of n = 2 seeds
  capsys.readouterr()
  assert sweep.main(["--config", FINETUNE, "--sweep", "seed=[0,1]", "--workdir",
                     str(tmp_path), "--run", "local"]) == 0
  assert capsys.readouterr().out.count("done, skipping") == 2


# --------------------------------------------------- grid selection on the validation split
# (CAMContrast Appendix A / Table A.1: pick on val, report the test split)

LRS = (1e-3, 1e-2, 1e-1)
VAL = {1e-3: 0.60, 1e-2: 0.75, 1e-1: 0.50}  # mean over seeds: 1e-2 is best on val
TEST = {1e-3: 0.95, 1e-2: 0.10, 1e-1: 0.99}  # ... and worst on test


def _select_sweep(root, val=VAL, test=TEST, seeds=(0, 1), eval_split="val", extra_key=None):
  """Fake finished runs: done.json holds the val metrics, eval_test/ the test ones."""
  runs, keys = [], ([extra_key[0]] if extra_key else []) + ["optim.lr", "seed"]
  for other in (extra_key[1] if extra_key else [None]):
    for lr in LRS:
      for s in seeds:
        values = {**({extra_key[0]: other} if extra_key else {}), "optim.lr": lr, "seed": s}
        name = ",".join(f"{k}={v}" for k, v in values.items())
        d = root / name
        (d / "eval_test").mkdir(parents=True)
        shift = 0.01 * s + (0.3 if other == "b" and lr == 1e-1 else 0.0)
        (d / "config.json").write_text(json.dumps({"train": {"eval_split": eval_split}}))
        (d / "done.json").write_text(json.dumps(
            {"step": 5, "eval/dice": val[lr] + shift, "eval/hd95": 10 * val[lr]}))
        (d / "eval_test" / "metrics.json").write_text(json.dumps(
            {"step": 5, "eval/dice": test[lr] + 0.01 * s, "eval/hd95": 3.0}))
        runs.append(dict(name=name, values=values))
  (root / "sweep.json").write_text(json.dumps(dict(keys=keys, runs=runs)))


def test_selection_reads_only_validation_metrics(tmp_path):
  _select_sweep(tmp_path)
  sel = sweep_select.select(tmp_path, "eval/dice", test="skip")
  (choice,) = sel["choices"]
  assert sel["mode"] == "max" and sel["over"] == ["optim.lr"]
  assert choice["chosen"] == {"optim.lr": 1e-2} and choice["score"] == pytest.approx(0.755)
  assert choice["runs"] == ["optim.lr=0.01,seed=0", "optim.lr=0.01,seed=1"]
  assert choice["test"]["eval/dice"] == pytest.approx((0.105, np.std([0.1, 0.11], ddof=1), 2))
  # Any test metrics at all: the choice stays; only the reported test numbers follow.
  for trial, test in enumerate([{1e-3: 0.0, 1e-2: 0.0, 1e-1: 1.0},
                                {1e-3: float("nan"), 1e-2: 0.5, 1e-1: 2.0}]):
    for lr in LRS:
      for s in (0, 1):
        path = tmp_path / f"optim.lr={lr},seed={s}" / "eval_test" / "metrics.json"
        path.write_text(json.dumps({"eval/dice": test[lr] + trial}))
    again = sweep_select.select(tmp_path, "eval/dice", test="skip")["choices"][0]
    assert again["chosen"] == {"optim.lr": 1e-2}
    assert again["candidates"] == choice["candidates"]
    assert again["test"]["eval/dice"][0] == pytest.approx(test[1e-2] + trial)
  text = sweep_table.aggregate(tmp_path)
  assert "## Selection on `eval/dice` (maximum over optim.lr" in text
  assert "| - | optim.lr=0.01 | 0.755 | 2 | 1.5 ± 0 |" in text


def test_selection_direction_ties_and_skipped_runs(tmp_path):
  _select_sweep(tmp_path, val={1e-3: 0.7, 1e-2: 0.7, 1e-1: 0.5})
  assert sweep_select.direction("eval/hd95") == "min"
  assert sweep_select.direction("eval/loss") == "min"
  assert sweep_select.direction("eval/ece_pixel") == "min"
  assert sweep_select.direction("eval/dice") == "max"
  assert sweep_select.direction("eval/hd95", "max") == "max"
  # A tie goes to the first candidate in the sweep's order (here the smaller lr) ...
  assert sweep_select.choose(tmp_path, "eval/dice")[0]["chosen"] == {"optim.lr": 1e-3}
  spec = json.loads((tmp_path / "sweep.json").read_text())
  spec["runs"] = spec["runs"][2:4] + spec["runs"][:2] + spec["runs"][4:]
  (tmp_path / "sweep.json").write_text(json.dumps(spec))
  # ... so listing the grid the other way round picks the other one, deterministically.
  assert sweep_select.choose(tmp_path, "eval/dice")[0]["chosen"] == {"optim.lr": 1e-2}
  # hd95 = 10 * val: minimized, 1e-1 wins.
  assert sweep_select.choose(tmp_path, "eval/hd95")[0]["chosen"] == {"optim.lr": 1e-1}
  # A diverged run (NaN) and an unfinished one are not candidates.
  (tmp_path / "optim.lr=0.1,seed=0" / "done.json").write_text(json.dumps({"eval/dice": "nan"}))
  (tmp_path / "optim.lr=0.1,seed=1" / "done.json").unlink()
  choice = sweep_select.choose(tmp_path, "eval/hd95")[0]
  assert choice["skipped"] == ["optim.lr=0.1,seed=0", "optim.lr=0.1,seed=1"]
  assert choice["candidates"][2] == dict(values={"optim.lr": 0.1}, runs=[], n=0, score=None)


def test_selection_per_group_and_refuses_the_test_split(tmp_path):
  _select_sweep(tmp_path / "g", extra_key=("init_from", ["a", "b"]))
  choices = sweep_select.choose(tmp_path / "g", "eval/dice", over=["optim.lr"])
  assert [(c["fixed"], c["chosen"]) for c in choices] == [
      ({"init_from": "a"}, {"optim.lr": 1e-2}), ({"init_from": "b"}, {"optim.lr": 1e-1})]
  with pytest.raises(sweep_select.SelectError, match="not keys of the sweep"):
    sweep_select.choose(tmp_path / "g", "eval/dice", over=["lr"])
  _select_sweep(tmp_path / "t", eval_split="test")
  with pytest.raises(sweep_select.SelectError, match="would use the test split"):
    sweep_select.choose(tmp_path / "t", "eval/dice")
  with pytest.raises(sweep_select.SelectError, match="not an evaluation metric"):
    sweep_select.choose(tmp_path / "g", "train/loss")
  for name in ("optim.lr=0.01,seed=0", "optim.lr=0.01,seed=1"):
    (tmp_path / "t" / name / "done.json").unlink()
  (tmp_path / "t" / "sweep.json").write_text(json.dumps(dict(keys=["optim.lr"], runs=[
      dict(name="optim.lr=0.01,seed=0", values={"optim.lr": 0.01})])))
  with pytest.raises(sweep_select.SelectError, match="no finished run"):
    sweep_select.choose(tmp_path / "t", "eval/dice")


def test_selection_evaluates_only_the_chosen_runs_on_the_test_split(tmp_path):
  _select_sweep(tmp_path)
  for d in tmp_path.glob("*/eval_test"):
    shutil.rmtree(d)
  choices = sweep_select.choose(tmp_path, "eval/dice")
  cmds = sweep_select.heldout_commands(tmp_path, choices, "eval/dice", "test", "python")
  assert cmds == [["python", "-m", "medrep_jax.evaluate", "--workdir",
                   str(tmp_path / f"optim.lr=0.01,seed={s}"), "--split", "test", "--name",
                   "test"] for s in (0, 1)]
  stage = sweep_select.heldout_commands(tmp_path, choices, "seg/eval/dice", "test", "python")
  assert stage[0][4] == str(tmp_path / "optim.lr=0.01,seed=0" / "seg")


def test_sweep_cli_checks_the_split_up_front_and_selects_later(tmp_path, capsys):
  args = ["--config", FINETUNE + ",task=segmentation", "--sweep", "optim.lr=[0.01,0.1]",
          "--workdir", str(tmp_path), "--select-by", "eval/dice"]
  assert sweep.main(args + ["--extra", "--config.train.eval_split=test"]) == 2
  err = capsys.readouterr().err
  assert "run optim.lr=0.01: selecting on eval/dice would read the test split" in err
  assert sweep.main(args[:-1] + ["train/loss"]) == 2
  assert "not an evaluation metric" in capsys.readouterr().err
  assert sweep.main(args[:-2] + ["--select-mode", "min"]) == 2
  assert "need --select-by" in capsys.readouterr().err
  assert sweep.main(args + ["--select-mode", "max"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 3 and out[2].endswith(f"python -m launch.sweep select {tmp_path}")
  spec = json.loads((tmp_path / "sweep.json").read_text())
  assert spec["select"] == dict(by="eval/dice", mode="max", over=None, test_split="test")
  # After the runs (faked here): `select` reads its settings from sweep.json.
  for lr, dice in ((0.01, 0.4), (0.1, 0.6)):
    d = tmp_path / f"optim.lr={lr}"
    (d / "eval_test").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"eval_split": "val"}}))
    (d / "done.json").write_text(json.dumps({"eval/dice": dice}))
    (d / "eval_test" / "metrics.json").write_text(json.dumps({"eval/dice": dice / 2}))
  assert sweep.main(["select", str(tmp_path), "--test", "skip"]) == 0
  assert "| - | optim.lr=0.1 | 0.6 | 1 | 0.3 |" in capsys.readouterr().out
  assert "## Selection" in (tmp_path / "sweep.md").read_text()
  assert sweep.main(["select", str(tmp_path), "--mode", "min", "--test", "skip"]) == 0
  assert "| - | optim.lr=0.01 | 0.4 | 1 | 0.2 |" in capsys.readouterr().out


def test_documented_grid_selection_commands_expand_and_score_val():
  """The `python -m launch.sweep --select-by` commands of docs/results/paper_tables.md
  (```sh blocks) build every run at the documented size, each scored on val."""
  text = (REPO_ROOT / "docs" / "results" / "paper_tables.md").read_text()
  blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)
  cmds = [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()
          if line.strip().startswith("python -m launch.sweep")]
  assert len(cmds) >= 2
  for cmd in cmds:
    args = sweep._expand_parser().parse_args(sweep._join_dash_values(shlex.split(cmd)[3:]))
    # segmentation (Table 9, Dice) or the 3-D fine-tuning of Table 11 (AUC)
    assert args.select_by in ("eval/dice", "eval/auc") and args.run == "local"
    config = str(REPO_ROOT / args.config)
    runs = sweep_spec.expand(config, args.sweep, sweep_spec.split_extra(args.extra),
                             check=lambda c: sweep_select.check_config(c, args.select_by))
    grid = ({1e-3, 3e-3, 1e-2, 3e-2, 1e-1} if args.select_by == "eval/dice"
            else {1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1})
    assert len(runs) in (5, 15) and {r.values["optim.lr"] for r in runs} == grid


def test_selection_on_a_pipeline_stage_reads_that_stage(tmp_path):
  """`<stage>/eval/<name>`: the stage's done.json and its own config.json's eval split."""
  runs = []
  for lr, dice, split in ((0.01, 0.3, "val"), (0.1, 0.6, "val")):
    name = f"optim.lr={lr}"
    (tmp_path / name / "seg").mkdir(parents=True)
    (tmp_path / name / "config.json").write_text(json.dumps({"stages": ["seg"]}))
    (tmp_path / name / "seg" / "config.json").write_text(
        json.dumps({"train": {"eval_split": split}}))
    (tmp_path / name / "seg" / "done.json").write_text(json.dumps({"eval/dice": dice}))
    runs.append(dict(name=name, values={"optim.lr": lr}))
  (tmp_path / "sweep.json").write_text(json.dumps(dict(keys=["optim.lr"], runs=runs)))
  assert sweep_select.choose(tmp_path, "seg/eval/dice")[0]["chosen"] == {"optim.lr": 0.1}
  (tmp_path / "optim.lr=0.1" / "seg" / "config.json").write_text(
      json.dumps({"train": {"eval_split": "test"}}))
  with pytest.raises(sweep_select.SelectError, match="would use the test split"):
    sweep_select.choose(tmp_path, "seg/eval/dice")
