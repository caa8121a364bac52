"""The command line: SIGTERM + resume equivalence, overrides, and every config's tiny run."""
import json
import logging
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


# Configs whose tiny run is the same stages as part of a pipeline's tiny run: they are
# resolved and checked against that pipeline instead of trained again (CI time).
COVERED_BY = {"ldm": "pipeline_dcl_cstp", "dcl_cstp": "pipeline_dcl_cstp",
              "drfl": "pipeline_drfl", "dsdm": "pipeline_dsdm"}


def _stage_configs(config):
  return [config[s] for s in config.stages] if pipeline.is_pipeline(config) else [config]


# Each config's tiny run is cached per session (tiny_run); the xdist group keeps a config's
# tests on one worker so a method's own test module reuses the same run.
@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xdist_group(COVERED_BY.get(p.stem, p.stem)))
    for p in CONFIGS], ids=[p.stem for p in CONFIGS])
def test_every_config_resolves_and_runs_two_steps(path, tiny_run):
  config = load_config(path.stem)
  assert config.is_locked
  runs = _stage_configs(config)
  for run in runs:
    assert run.method in methods.available()
    methods.load_method(run)  # resolves the module and its stage
    if "train" in run:
      assert run.train.num_steps <= 2, "tiny variants must run in a couple of steps"
  if path.stem in COVERED_BY:
    cover = _stage_configs(load_config(COVERED_BY[path.stem]))
    shapes = {(r.method, r.get("stage", "")) for r in cover}
    assert {(r.method, r.get("stage", "")) for r in runs} <= shapes
    return
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


# ------------------------------------------------------------------ library noise, --verbose

# Run in a subprocess (the filter is process-wide): JAX is imported before the filter, as
# under `main` (the config files import it), then orbax warns and our own messages print.
NOISE_SCRIPT = r"""
import logging, os, sys, warnings
import jax
from medrep_jax import quiet
quiet.install(quiet.verbose_requested())
print("TF_CPP_MIN_LOG_LEVEL=" + os.environ.get("TF_CPP_MIN_LOG_LEVEL", "unset"), flush=True)
import numpy as np, orbax.checkpoint as ocp
manager = ocp.CheckpointManager(sys.argv[1])
manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": np.ones(3)})))
manager.wait_until_finished()
manager.close()
with ocp.StandardCheckpointer() as ckptr:  # the state item alone: orbax warns (absl)
  ckptr.metadata(os.path.join(sys.argv[1], "0", "state"))
logging.getLogger("matplotlib.font_manager").warning("a library warning")
logging.getLogger("jax._src.xla_bridge").info("a library note")
warnings.warn("Some donated buffers were not usable: float32[3]")
logging.getLogger("medrep_jax.data").warning("our warning")
logging.getLogger("orbax.checkpoint").error("a library error")
print("our output", flush=True)
"""


def clean_env(**extra: str) -> dict[str, str]:
  """os.environ without the variables under test (and the test-run compile cache, so the
  console is what a user sees), plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "MEDREP_VERBOSE", "JAX_COMPILATION_CACHE_DIR")
         and not k.startswith("JAX_PERSISTENT_CACHE")}
  return {**env, **extra}


def run_noise_script(workdir, *args, **env):
  return subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(workdir), *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                        env=clean_env(**env))


def test_library_noise_hidden_by_default_and_shown_with_verbose(tmp_path):
  quiet_run = run_noise_script(tmp_path / "a")
  assert quiet_run.returncode == 0, quiet_run.stderr
  for ours in ("our output", "TF_CPP_MIN_LOG_LEVEL=3"):
    assert ours in quiet_run.stdout
  for ours in ("our warning", "a library error", "a library warning"):
    assert ours in quiet_run.stderr
  for noise in ("Metadata file does not exist", "donated buffers", "a library note"):
    assert noise not in quiet_run.stderr, quiet_run.stderr
  verbose_run = run_noise_script(tmp_path / "b", "--verbose")  # or MEDREP_VERBOSE=1
  assert verbose_run.returncode == 0, verbose_run.stderr
  assert "TF_CPP_MIN_LOG_LEVEL=1" in verbose_run.stdout  # JAX's default
  for message in ("Metadata file does not exist", "donated buffers", "our warning"):
    assert message in verbose_run.stderr


def test_user_log_level_is_kept(tmp_path):
  r = run_noise_script(tmp_path, TF_CPP_MIN_LOG_LEVEL="2")
  assert r.returncode == 0, r.stderr
  assert "TF_CPP_MIN_LOG_LEVEL=2" in r.stdout


def test_noise_filter_passes_ours_and_errors(monkeypatch):
  from medrep_jax import quiet

  def record(name, level, pathname):
    return logging.LogRecord(name, level, pathname, 1, "message", (), None)

  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "manager.py")
  ours = str(REPO_ROOT / "medrep_jax" / "data" / "sources.py")
  keep = [record("absl", logging.ERROR, orbax_file), record("root", logging.WARNING, ours),
          record("medrep_jax.train.trainer", logging.INFO, ours),
          record("matplotlib", logging.WARNING, "matplotlib/x.py")]
  drop = [record("absl", logging.WARNING, orbax_file), record("absl", logging.INFO, "x.py"),
          record("jax._src.xla_bridge", logging.INFO, "jax/_src/xla_bridge.py")]
  noise = quiet.NoiseFilter()
  assert [noise.filter(r) for r in keep] == [True] * len(keep)
  assert [noise.filter(r) for r in drop] == [False] * len(drop)
  monkeypatch.delenv("MEDREP_VERBOSE", raising=False)
  assert quiet.verbose_requested(["prog", "--verbose"])
  assert not quiet.verbose_requested(["prog", "--noverbose"])
  monkeypatch.setenv("MEDREP_VERBOSE", "1")
  assert quiet.verbose_requested(["prog"])


ALARM_SCRIPT = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from medrep_jax import quiet
quiet.install(quiet.verbose_requested())
const = np.random.RandomState(0).rand(12_000).astype(np.float32)
start = time.time()  # XLA constant-folds the sort of a constant (slow_operation_alarm > 1 s)
jax.jit(lambda: jnp.sort(jnp.asarray(const))[-1])().block_until_ready()
print(f"seconds={time.time() - start:.2f}", flush=True)
"""


@pytest.mark.slow
def test_xla_slow_operation_alarm_hidden_unless_verbose():
  runs = {flag: subprocess.run([sys.executable, "-c", ALARM_SCRIPT, *flag], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=300, env=clean_env())
          for flag in ((), ("--verbose",))}
  for r in runs.values():
    assert r.returncode == 0, r.stderr
    seconds = float(r.stdout.split("seconds=")[1])
    if seconds < 1.5:
      pytest.skip(f"constant folding took {seconds:.2f}s: too fast to raise the alarm")
  assert "slow_operation_alarm" not in runs[()].stderr, runs[()].stderr
  assert "Constant folding an instruction is taking" in runs[("--verbose",)].stderr


def test_commands_accept_verbose(tmp_path, capsys):
  r = subprocess.run(cli(tmp_path / "run", "--print_config", "--verbose"), cwd=REPO_ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  from medrep_jax import evaluate, export, predict, radiomics
  for module in (predict, evaluate, export, radiomics):
    with pytest.raises(SystemExit) as exit_info:
      module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--verbose" in capsys.readouterr().out, module.__name__


@pytest.mark.xdist_group("finetune")  # reuses the tiny finetune run of the test above
def test_tensorboard_has_learning_rate_and_figures(tiny_run):
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(tiny_run("finetune") / "tb"),
                                              size_guidance={"images": 0})
  events.Reload()
  assert "lr" in events.Tags()["scalars"]
  assert "figures/confusion_matrix" in events.Tags()["images"], events.Tags()
  image = events.Images("figures/confusion_matrix")[-1]
  assert image.step == 2 and image.width > 100 and image.height > 100
