"""The command line: SIGTERM + resume equivalence, overrides, and every config's tiny run."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from medrep_jax import config_lib, methods
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.train import pipeline, trainer

from conftest import REPO_ROOT, load_config

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.py"))


def cli(workdir, *overrides, config="configs/finetune.py:size=tiny"):
  return [sys.executable, "-m", "medrep_jax.main", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def train_losses(workdir) -> dict[int, float]:
  rows = []
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line still being written
      pass
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


RESUME_OVERRIDES = ("--config.train.num_steps=40", "--config.train.log_every=1",
                    "--config.train.checkpoint_every=0", "--config.train.max_eval_examples=8",
                    "--config.data.num_examples=64", "--config.train.progress=False")


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
  """Killed (SIGTERM) at step k and resumed == uninterrupted, on 8 fake devices."""
  env = dict(os.environ)
  assert "xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run(cli(full, *RESUME_OVERRIDES), check=True, env=env, cwd=REPO_ROOT,
                 capture_output=True)
  proc = subprocess.Popen(cli(killed, *RESUME_OVERRIDES), env=env, cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline:
    metrics = killed / "metrics.jsonl"
    if metrics.exists() and len(train_losses(killed)) >= 3:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out
  assert "SIGTERM: saved a checkpoint at step" in out
  k = ckpt_lib.Checkpointer(killed / "checkpoints", every=0, keep=1).latest_step()
  assert k is not None and 3 <= k < 40, out
  resumed = subprocess.run(cli(killed, *RESUME_OVERRIDES), env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"at step {k}" in resumed.stdout
  a, b = train_losses(full), train_losses(killed)
  assert sorted(b) == list(range(1, 41))  # no gaps, no duplicates
  np.testing.assert_allclose([b[s] for s in range(1, 41)], [a[s] for s in range(1, 41)],
                             rtol=1e-6)
  pa = ckpt_lib.load_state_tree(full)["params"]
  pb = ckpt_lib.load_state_tree(killed)["params"]
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_unknown_override_suggests_key(tmp_path):
  r = subprocess.run(cli(tmp_path, "--config.train.num_stesp=3"), cwd=REPO_ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0
  assert "num_steps" in r.stderr and "Did you mean" in r.stderr


def test_unknown_variant_arg_suggests_key():
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'task'"):
    load_config("finetune", "tsak=segmentation")
  with pytest.raises(config_lib.ConfigError, match="not key=value"):
    load_config("finetune", "size")


# Each config's tiny run is cached per session (tiny_run); the xdist group keeps a config's
# tests on one worker so a method's own test module reuses the same run.
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xdist_group(p.stem))
                                  for p in CONFIGS], ids=[p.stem for p in CONFIGS])
def test_every_config_resolves_and_runs_two_steps(path, tiny_run):
  config = load_config(path.stem)
  assert config.is_locked
  runs = [config[s] for s in config.stages] if pipeline.is_pipeline(config) else [config]
  for run in runs:
    assert run.method in methods.available()
    methods.load_method(run)  # resolves the module and its stage
    if "train" in run:
      assert run.train.num_steps <= 2, "tiny variants must run in a couple of steps"
  workdir = tiny_run(path.stem)
  assert (workdir / "report.md").exists()
  assert (workdir / "config.json").exists()


def test_list_names_configs_variant_values_methods_stages_and_datasets():
  r = subprocess.run([sys.executable, "-m", "medrep_jax.main", "--list"], cwd=REPO_ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  for config in CONFIGS:
    assert f"\n  {config.stem}\n" in r.stdout
  assert "size='paper'  [paper | small | tiny]" in r.stdout
  assert "ldm: vae, unet, sample, filter" in r.stdout
  assert "pneumoniamnist" in r.stdout


def test_print_config_shows_overrides_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  r = subprocess.run(cli(workdir, "--config.optim.lr=0.5", "--print_config"), cwd=REPO_ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "method: finetune" in r.stdout and "lr: 0.5" in r.stdout
  assert not workdir.exists()
