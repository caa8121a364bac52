"""A workdir that cannot be corrupted, and errors for people (issue 12, items 4 and 5).

NaN-safe checkpoints, the run lock, config checks before anything is written, shape
mismatches on restore, one-paragraph errors from the command line, and the data-layer
messages that name the file, key or config field.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax import config_lib, errors
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.core import memory_bank
from medrep_jax.core import workdir as workdir_lib
from medrep_jax.data import readers
from medrep_jax.data.sources import DataError
from medrep_jax.methods import load_method
from medrep_jax.train import trainer
from medrep_jax.train.logging import MetricWriter, read_metrics

from conftest import REPO_ROOT, load_config


def tiny(**train):
  """finetune.py:size=tiny,data=phantoms on 32 phantoms, unlocked."""
  c = load_config("finetune")
  with c.unlocked():
    c.data.num_examples = 32
    c.train.progress = False
    c.train.update(train)
  return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """copy_to(path): a copy of one finished tiny run (2 steps, checkpoint at step 2)."""
  src = tmp_path_factory.mktemp("finished")
  trainer.train_and_evaluate(tiny(), src)

  def copy_to(path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, path)
    return path

  return copy_to


def finite_checkpoints(workdir) -> list[int]:
  """The steps of the checkpoints in workdir; fails if one holds a NaN or Inf."""
  ckpts = pathlib.Path(workdir) / "checkpoints"
  steps = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) if ckpts.is_dir() \
      else []
  for s in steps:
    tree = ckpt_lib.load_state_tree(ckpts / str(s))
    for leaf in jax.tree.leaves(tree):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"step {s} is not finite"
  return steps


# ------------------------------------------------------------------- NaN-safe saves


def test_nonfinite_update_writes_no_checkpoint_and_a_sane_rerun_finishes(tmp_path):
  """Issue 12, failure 1: lr=1e39 makes step 1's update Inf while its metrics are finite."""
  c = tiny(checkpoint_every=1, num_steps=2)
  c.optim.lr = 1e39
  with pytest.raises(errors.NonFiniteError, match=r"state leaf 'params/.*' is NaN or Inf "
                     r"after step 1.*no checkpoint had been written"):
    trainer.train_and_evaluate(c, tmp_path)
  assert finite_checkpoints(tmp_path) == []
  assert not (tmp_path / "done.json").exists() and not (tmp_path / ".lock").exists()
  c.optim.lr = 1e-3  # nothing to resume, so no --allow_config_change is needed
  trainer.train_and_evaluate(c, tmp_path)
  assert finite_checkpoints(tmp_path) == [1, 2]
  assert (tmp_path / "done.json").exists()
  assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2]  # no stale step 1
  history = [json.loads(l) for l in (tmp_path / "config_history.jsonl").read_text().split("\n")
             if l]
  assert history[-1]["changes"] == {"optim.lr": {"old": 1e39, "new": 1e-3}}


def test_nonfinite_state_keeps_the_last_good_checkpoint_and_resumes(tmp_path):
  """The optimizer state turns Inf in step 3 while every metric stays finite: checkpoints
  1 and 2 stay; a changed config is refused on resume unless allowed, and then recorded."""
  c = tiny(checkpoint_every=1, num_steps=4, keep_checkpoints=5)
  method = load_method(c)
  clean_step = method.train_step

  def poisoned_step(state, batch, rng):
    state, metrics = clean_step(state, batch, rng)
    inf = jnp.where(state.step >= 3, jnp.inf, 0.0)
    opt_state = jax.tree.map(
        lambda x: x + inf.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        state.opt_state)
    return state.replace(opt_state=opt_state), metrics

  method.train_step = poisoned_step
  with pytest.raises(errors.NonFiniteError, match=r"state leaf 'opt_state/.*' is NaN or Inf "
                     r"after step 3; .*last good checkpoint \(step 2\)"):
    trainer.Trainer(c, tmp_path, method).run()
  assert finite_checkpoints(tmp_path) == [1, 2]
  assert not (tmp_path / ".lock").exists()
  before = (tmp_path / "config.json").read_bytes()
  c.optim.lr = 5e-4
  with pytest.raises(errors.ConfigChanged, match=r"(?s)checkpoint at step 2.*optim.lr: "
                     r"0.001 -> 0.0005.*--allow_config_change"):
    trainer.train_and_evaluate(c, tmp_path)
  assert (tmp_path / "config.json").read_bytes() == before
  trainer.train_and_evaluate(c, tmp_path, allow_config_change=True)
  assert finite_checkpoints(tmp_path)[-1] == 4
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 5e-4
  entry = json.loads((tmp_path / "config_history.jsonl").read_text().splitlines()[-1])
  assert entry["step"] == 2 and set(entry) == {"time", "step", "changes"}
  assert entry["changes"] == {"optim.lr": {"old": 1e-3, "new": 5e-4}}
  assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3, 4]


def test_first_nonfinite_names_the_leaf():
  tree = {"params": {"a": np.ones(3, np.float32), "b": np.array([1.0, np.inf], np.float32)},
          "step": np.int32(3), "opt_state": {"c": np.full(2, np.nan, np.float32)}}
  assert ckpt_lib.first_nonfinite(tree) == "params/b"
  assert ckpt_lib.first_nonfinite({"params": {"a": np.ones(2)}}) is None


# ---------------------------------------------------------------------------- lock


def _foreign_lock(workdir: pathlib.Path, pid: int, host: str | None = None) -> dict:
  owner = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00",
           "command": "python -m medrep_jax.main (another run)", "token": "other"}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / ".lock").write_text(json.dumps(owner))
  return owner


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
  live = subprocess.Popen(["sleep", "60"])
  try:
    _foreign_lock(tmp_path, live.pid)
    with pytest.raises(errors.WorkdirLocked, match=rf"pid {live.pid} on host "
                       rf"{socket.gethostname()} since 2026-01-01T00:00:00"):
      with workdir_lib.lock(tmp_path):
        pass
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == live.pid  # untouched
  finally:
    live.kill()
    live.wait()
  with workdir_lib.lock(tmp_path, command="test") as info:  # the owner is dead now
    assert "Taking over the stale lock" in capsys.readouterr().out
    held = json.loads((tmp_path / ".lock").read_text())
    assert held["pid"] == os.getpid() and held["command"] == "test" and held == info
    with workdir_lib.lock(tmp_path / "stage"):  # nested: a pipeline's stage, no deadlock
      assert not (tmp_path / "stage" / ".lock").exists()
  assert not (tmp_path / ".lock").exists()


def test_lock_of_another_host_is_not_taken(tmp_path):
  _foreign_lock(tmp_path, 1, host="elsewhere.example")
  with pytest.raises(errors.WorkdirLocked, match="delete .*\\.lock"):
    with workdir_lib.lock(tmp_path):
      pass


def test_lock_works_without_hard_links(tmp_path, monkeypatch):
  def no_links(*_):
    raise OSError(1, "Operation not permitted")  # e.g. a Google Drive mount in Colab

  monkeypatch.setattr(os, "link", no_links)
  with workdir_lib.lock(tmp_path) as info:
    assert json.loads((tmp_path / ".lock").read_text()) == info
    second = subprocess.run(  # another process is still refused
        [sys.executable, "-c", "import sys; from medrep_jax.core import workdir\n"
         "with workdir.lock(sys.argv[1]): pass", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert second.returncode != 0 and f"pid {os.getpid()}" in second.stderr, second.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_is_released_on_error_and_a_new_folder_removed(tmp_path):
  workdir = tmp_path / "new" / "run"
  with pytest.raises(RuntimeError):
    with workdir_lib.lock(workdir):
      assert (workdir / ".lock").exists()
      raise RuntimeError("boom")
  assert not (tmp_path / "new").exists()


def test_a_held_workdir_refuses_a_training_run(tmp_path):
  live = subprocess.Popen(["sleep", "60"])
  try:
    _foreign_lock(tmp_path, live.pid)
    with pytest.raises(errors.WorkdirLocked, match=f"pid {live.pid}"):
      trainer.train_and_evaluate(tiny(), tmp_path)
  finally:
    live.kill()
    live.wait()
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


# ------------------------------------------------------------------- config checks


def test_config_diff_uses_dotted_keys_and_ignores_runtime_fields():
  old = {"optim": {"lr": 1e-3, "b": (1, 2)}, "train": {"progress": True, "num_threads": 4}}
  new = {"optim": {"lr": 1e-2, "b": [1, 2], "c": 1}, "train": {"progress": False}}
  assert workdir_lib.config_diff(old, new) == {"optim.c": (errors.MISSING, 1),
                                               "optim.lr": (1e-3, 1e-2)}
  staged = workdir_lib.config_diff({"s": {"train": {"prefetch": 1}}},
                                   {"s": {"train": {"prefetch": 2}}})
  assert staged == {}  # the same field inside a pipeline stage


def test_finished_run_refuses_another_config_and_keeps_config_json(tmp_path, finished_run):
  workdir = finished_run(tmp_path / "run")
  before = (workdir / "config.json").read_bytes()
  c = tiny()
  c.optim.lr = 0.01
  c.train.batch_size = 16
  with pytest.raises(errors.ConfigChanged) as e:
    trainer.train_and_evaluate(c, workdir, allow_config_change=True)
  assert "optim.lr: 0.001 -> 0.01" in str(e.value)
  assert "train.batch_size: 8 -> 16" in str(e.value)
  assert "is finished" in str(e.value) and "--workdir" in str(e.value)
  assert (workdir / "config.json").read_bytes() == before
  assert not (workdir / "config_history.jsonl").exists()
  same = tiny(progress=True, num_threads=1)  # fields that cannot change results
  assert trainer.train_and_evaluate(same, workdir)["step"] == 2


def test_bad_data_leaves_the_workdir_as_it_was(tmp_path, finished_run):
  c = tiny()
  with c.unlocked():
    c.data.name = "image_folder"
    c.data.root = str(tmp_path / "no_such_folder")
  workdir = tmp_path / "run"
  with pytest.raises(DataError, match="no_such_folder"):
    trainer.train_and_evaluate(c, workdir)
  assert not workdir.exists()  # no checkpoints/, tb/ or config.json, and no folder
  # An unfinished run's config.json is not rewritten by a failed attempt either.
  finished_run(workdir)
  os.remove(workdir / "done.json")
  before = sorted(p.name for p in workdir.iterdir()), (workdir / "config.json").read_bytes()
  with pytest.raises(DataError):
    trainer.train_and_evaluate(c, workdir, allow_config_change=True)
  assert (sorted(p.name for p in workdir.iterdir()), (workdir / "config.json").read_bytes()) \
      == before


def test_restore_with_other_shapes_names_the_array_and_the_field(tmp_path, finished_run):
  workdir = finished_run(tmp_path / "run")
  os.remove(workdir / "done.json")  # as if killed after its last checkpoint
  c = tiny()
  c.data.num_classes = 2
  with pytest.raises(errors.CheckpointMismatch) as e:
    trainer.train_and_evaluate(c, workdir, allow_config_change=True)
  text = str(e.value)
  assert "params/head" in text and "(3,)" in text and "(2,)" in text, text
  assert "data.num_classes" in text and "config" in text
  assert json.loads((workdir / "config.json").read_text())["data"]["num_classes"] == 3


def test_pipeline_config_check_by_stage_status(tmp_path):
  import ml_collections as mlc
  from medrep_jax.train import pipeline
  config = mlc.ConfigDict({"stages": ("a", "b"), "a": {"lr": 1.0}, "b": {"lr": 1.0}})
  workdir_lib.write_json(tmp_path / "config.json", config.to_dict())
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "done.json").write_text("{}")
  changed_b = mlc.ConfigDict({**config.to_dict(), "b": {"lr": 2.0}})
  assert pipeline.check_pipeline_config(changed_b, tmp_path, allow=False) == {
      "b.lr": (1.0, 2.0)}  # b has not started: only recorded
  changed_a = mlc.ConfigDict({**config.to_dict(), "a": {"lr": 2.0}})
  with pytest.raises(errors.ConfigChanged, match=r"finished stage\(s\) \['a'\]"):
    pipeline.check_pipeline_config(changed_a, tmp_path, allow=True)
  more = mlc.ConfigDict({**config.to_dict(), "stages": ("a", "b", "c"), "c": {"lr": 1.0}})
  with pytest.raises(errors.ConfigChanged, match="--allow_config_change"):
    pipeline.check_pipeline_config(more, tmp_path, allow=False)
  assert "stages" in pipeline.check_pipeline_config(more, tmp_path, allow=True)


def test_checkpointer_and_writer_create_nothing_before_writing(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
  assert ckpt.latest_step() is None
  ckpt.close()
  writer = MetricWriter(tmp_path)
  writer.close()
  assert list(tmp_path.iterdir()) == []


def test_truncate_drops_a_half_written_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n'
                                          '{"step": 2, "split": "tra')
  writer = MetricWriter(tmp_path, tensorboard=False)
  writer.truncate_after(5)
  writer.write(2, "train", {"loss": 0.5})
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# ------------------------------------------------------------------ data messages


def test_object_npz_names_the_file_and_key(tmp_path):
  path = tmp_path / "objects.npz"
  images = np.empty(2, object)
  images[:] = [np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)]
  np.savez(path, train_images=images, train_labels=np.array([[0], [1]], object),
           val_images=images, val_labels=np.zeros((2, 1)), test_images=images,
           test_labels=np.zeros((2, 1)))
  with pytest.raises(DataError, match=r"objects.npz: array 'train_labels' is stored as "
                     r"Python objects .* numeric array"):
    readers.MedMNIST(path, "train")


def test_non_dicom_file_is_named_without_the_force_hint(tmp_path):
  from medrep_jax.data.dicom import DicomFolder
  (tmp_path / "p1").mkdir()
  (tmp_path / "p1" / "slice.dcm").write_bytes(b"not a dicom file" * 20)
  source = DicomFolder(tmp_path, "all")
  with pytest.raises(DataError) as e:
    source[0]
  assert "slice.dcm is not a DICOM file" in str(e.value)
  assert "force" not in str(e.value) and "data.skip_corrupt" in str(e.value)


def test_bank_and_mask_errors_name_the_config_field(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"loss.bank_size to at most 6"):
    memory_bank.check_bank(32, 2, dataset_size=6)
  (tmp_path / "images").mkdir()
  (tmp_path / "labels").mkdir()
  from PIL import Image
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "a.png")
  with pytest.raises(DataError, match=r"mask folder .*masks does not exist \(data.mask_dir="
                     r"'masks'\).*'labels'"):
    readers.ImageMaskFolder(tmp_path, "all")


# --------------------------------------------------------------- the command line


def cli(workdir, *flags, config="configs/finetune.py:size=tiny,data=phantoms"):
  return [sys.executable, "-m", "medrep_jax.main", f"--config={config}",
          f"--workdir={workdir}", "--config.train.progress=False",
          "--config.data.num_examples=32", *flags]


def test_cli_error_is_one_paragraph_without_traceback(tmp_path):
  workdir = tmp_path / "run"
  bad = (f"--config.data.name=image_folder", f"--config.data.root={tmp_path}/missing")
  r = subprocess.run(cli(workdir, *bad), cwd=REPO_ROOT, capture_output=True, text=True)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr + r.stdout
  assert f"{tmp_path}/missing" in r.stderr and "data.root" in r.stderr
  assert "--debug" in r.stderr
  assert not workdir.exists()
  env = dict(os.environ, MEDREP_DEBUG="1")
  r = subprocess.run(cli(workdir, *bad), cwd=REPO_ROOT, capture_output=True, text=True,
                     env=env)
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_unknown_override_is_one_line():
  r = subprocess.run(cli("unused", "--config.optim.lrr=0.1"), cwd=REPO_ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 2
  first = r.stderr.strip().splitlines()[0]
  assert first == ("medrep_jax: unknown config key 'lrr' in --config.optim.lrr. "
                   "Did you mean \"lr\" instead of \"lrr\"?"), r.stderr
  assert "Traceback" not in r.stderr


def test_cli_sigterm_during_start_up_exits_with_a_message(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cli(workdir, "--config.train.num_steps=50"), cwd=REPO_ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  banner = proc.stdout.readline()  # printed once the flags are parsed, before any work
  assert "process(es)" in banner
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert "SIGTERM" in out + err and "Traceback" not in err
  assert not (workdir / ".lock").exists()


def test_fields_added_by_a_newer_release_at_their_default_are_no_change(tmp_path):
  """A run made before a field existed re-runs as "finished" while the new field holds its
  default; a non-default value of the new field is still a change."""
  config = load_config("finetune", "size=tiny,data=phantoms")
  old = config.to_dict()
  del old["optim"]["nesterov"], old["data"]["mask_combine"]  # "added" since the old run
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert workdir_lib.check_config(tmp_path, config, finished=True, resume_step=None,
                                  allow=False) == {}
  changed = config.copy_and_resolve_references()
  changed.optim.nesterov = True
  with pytest.raises(errors.ConfigChanged, match="optim.nesterov"):
    workdir_lib.check_config(tmp_path, changed, finished=True, resume_step=None, allow=False)
