"""launch.sweep: parsing, validation, expansion, run names, launch modes and aggregation."""
import csv
import json

import numpy as np
import pytest

from launch import sweep, sweep_spec, sweep_table

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
