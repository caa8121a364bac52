"""The fault table of issue 12: bad input and bad luck never lose data.

* kill -9 during a checkpoint write, then the same command: the stale lock is taken over,
  the run resumes from the last complete checkpoint and finishes; metrics.jsonl holds
  every step once.
* disk full while saving a checkpoint: the run stops with a message naming the folder and
  the error; the previous checkpoint restores and the run resumes.
* read-only workdir: exit code 2, one paragraph naming the folder, no traceback.
* two runs on one workdir: the second exits at once (code 2) naming the first's pid and
  host; the first goes on undisturbed.
* changed config on an unfinished run: refused with the diff (code 2), config.json
  unchanged; with --allow_config_change it resumes and records the change.
* changed config on a finished run: refused with the diff (code 2), config.json unchanged.

The command-line faults run `python -m medrep_jax.main` on finetune.py:size=tiny,data=phantoms.
"""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medrep_jax import errors
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.train import trainer
from medrep_jax.train.logging import read_metrics

from conftest import REPO_ROOT, load_config

BASE = ("--config.train.progress=False", "--config.data.num_examples=32",
        "--config.train.log_every=1", "--config.train.max_eval_examples=8")


def cli(workdir, *flags):
  return [sys.executable, "-m", "medrep_jax.main",
          "--config=configs/finetune.py:size=tiny,data=phantoms", f"--workdir={workdir}",
          *BASE, *flags]


def start(workdir, *flags) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(cli(workdir, *flags), cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run(workdir, *flags, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(cli(workdir, *flags), cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300, **kwargs)


def train_steps(workdir) -> list[int]:
  return [r["step"] for r in read_metrics(workdir, "train")]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      pytest.fail(f"the run ended early:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail("timed out")


def user_error(r: subprocess.CompletedProcess) -> str:
  assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
  assert "Traceback" not in r.stderr + r.stdout
  return r.stderr


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume(tmp_path):
  steps = 16
  flags = (f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1",
           "--config.train.keep_checkpoints=2")
  proc = start(tmp_path, *flags)
  wait_for(lambda: len(train_steps(tmp_path)) >= 4, proc)
  proc.send_signal(signal.SIGKILL)  # a checkpoint is saved (async) at every step
  proc.communicate(timeout=60)
  assert (tmp_path / ".lock").exists()  # left behind by the killed run
  killed_at = max(train_steps(tmp_path))
  assert killed_at < steps
  r = run(tmp_path, *flags)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "Taking over the stale lock" in r.stdout
  assert "Resumed from" in r.stdout
  assert train_steps(tmp_path) == list(range(1, steps + 1))  # each step once, no gaps
  assert (tmp_path / "done.json").exists() and not (tmp_path / ".lock").exists()
  assert int(ckpt_lib.load_state_tree(tmp_path)["step"]) == steps


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
  config = load_config("finetune")
  with config.unlocked():
    config.data.num_examples = 32
    config.train.update(num_steps=3, checkpoint_every=1, progress=False)
  real_save = ocp.CheckpointManager.save
  calls = []

  def full_disk(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) >= 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / str(step)))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(errors.WorkdirError, match=r"(?s)could not write checkpoint step 2 .*"
                     r"No space left on device.*last good checkpoint \(step 1\)"):
    trainer.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / ".lock").exists() and not (tmp_path / "done.json").exists()
  saved = ckpt_lib.load_state_tree(tmp_path)
  assert int(saved["step"]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)  # space freed
  assert trainer.train_and_evaluate(config, tmp_path)["step"] == 3
  assert train_steps(tmp_path) == [1, 2, 3]


def _read_only(workdir: pathlib.Path, cmd: list[str]) -> list[str] | None:
  """`cmd` with `workdir` read-only: a read-only mount in a private mount namespace when
  root (root writes through permission bits), else mode 0o555; None where impossible."""
  if os.geteuid() != 0:
    workdir.chmod(0o555)
    return cmd
  mount = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
  wrapped = ["unshare", "--mount", "sh", "-c", mount, str(workdir)]
  probe = subprocess.run([*wrapped, "true"], capture_output=True, check=False)
  return [*wrapped, *cmd] if probe.returncode == 0 else None


def test_read_only_workdir_is_a_clear_error(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  cmd = _read_only(workdir, cli(workdir))
  if cmd is None:
    pytest.skip("cannot make a read-only folder here (root without mount namespaces)")
  try:
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  finally:
    workdir.chmod(0o755)
  err = user_error(r)
  assert f"cannot write to the workdir {workdir}" in err and "writable --workdir" in err, err
  assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_two_runs_at_once_and_changed_configs(tmp_path):
  keep = "--config.train.checkpoint_every=0"  # only the SIGTERM save
  first = start(tmp_path, "--config.train.num_steps=100000", keep)
  wait_for(lambda: len(train_steps(tmp_path)) >= 2, first)
  owner = json.loads((tmp_path / ".lock").read_text())
  assert owner["pid"] == first.pid
  config_before = (tmp_path / "config.json").read_bytes()
  t0 = time.time()
  second = run(tmp_path, "--config.train.num_steps=100000", keep)
  err = user_error(second)
  assert f"pid {first.pid} on host {owner['host']} since {owner['started']}" in err
  assert time.time() - t0 < 120
  assert first.poll() is None  # the first run goes on undisturbed
  first.send_signal(signal.SIGTERM)
  out, _ = first.communicate(timeout=120)
  assert first.returncode == 143, out[-3000:]
  assert (tmp_path / "config.json").read_bytes() == config_before
  step = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every=0, keep=1).latest_step()
  assert step is not None and not (tmp_path / ".lock").exists()

  # Changed config on the unfinished run: refused with the diff; config.json unchanged.
  changed = ("--config.optim.lr=0.0005", f"--config.train.num_steps={step + 2}", keep)
  err = user_error(run(tmp_path, *changed))
  assert "optim.lr: 0.001 -> 0.0005" in err and f"train.num_steps: 100000 -> {step + 2}" in err
  assert "--allow_config_change" in err
  assert (tmp_path / "config.json").read_bytes() == config_before
  r = run(tmp_path, *changed, "--allow_config_change")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  history = json.loads((tmp_path / "config_history.jsonl").read_text().splitlines()[-1])
  assert history["step"] == step and set(history["changes"]) == {"optim.lr",
                                                                 "train.num_steps"}
  steps = train_steps(tmp_path)
  assert steps == sorted(set(steps)) and steps[-1] == step + 2

  # Changed config on the finished run: refused with the diff; config.json unchanged.
  finished = (tmp_path / "config.json").read_bytes()
  err = user_error(run(tmp_path, "--config.optim.lr=0.01",
                       f"--config.train.num_steps={step + 2}", keep))
  assert "is finished" in err and "optim.lr: 0.0005 -> 0.01" in err
  assert (tmp_path / "config.json").read_bytes() == finished
