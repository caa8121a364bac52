"""Shared pytest setup: 8 fake CPU devices and the real-data folder.

XLA flags must be set before jax is imported anywhere, so this file sets them
at import time (pytest imports conftest.py before any test module).
"""
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  # Tests compile many small programs: LLVM -O0 cuts CPU compile time ~2-3x with little
  # runtime cost at test sizes. Subprocesses (CLI tests) inherit it.
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

# One persistent XLA compilation cache per test run, shared by the xdist workers and the
# CLI subprocesses (they inherit the environment): many tests build the same tiny models,
# and compiling them, not running them, is most of the suite's time. The first process to
# import this file (the xdist controller) makes the folder and removes it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="medrep_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller, or a plain run
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
  """Returns MEDREP_DATA_DIR, else ../shared/data beside the repo, else None."""
  env = os.environ.get("MEDREP_DATA_DIR")
  if env and pathlib.Path(env).is_dir():
    return pathlib.Path(env)
  fallback = REPO_ROOT.parent / "shared" / "data"
  return fallback if fallback.is_dir() else None


if "MEDREP_DATA_DIR" not in os.environ and shared_data_dir() is not None:
  os.environ["MEDREP_DATA_DIR"] = str(shared_data_dir())  # named presets find their data


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  d = shared_data_dir()
  if d is None:
    pytest.skip("real data not found: set MEDREP_DATA_DIR or place ../shared/data beside the repo")
  return d


def config_module(name: str):
  """configs/<name>.py as a module, for its builders (e.g. `.finetune_config(...)`)."""
  from medrep_jax import config_lib
  return config_lib.config_module(name, REPO_ROOT / "configs")


def load_config(name: str, arg: str = "size=tiny,data=phantoms"):
  """The locked config of configs/<name>.py:<arg>, as `--config` loads it."""
  return config_module(name).get_config(arg)


def tiny_config(name: str):
  """The config `tiny_run(name)` runs: size=tiny on 32 phantoms (unlocked)."""
  config = load_config(name)
  with config.unlocked():
    for stage in (config.stages if "stages" in config else [None]):
      run_cfg = config[stage] if stage else config
      if "data" in run_cfg and run_cfg.data.name == "phantoms":
        run_cfg.data.num_examples = 32
  return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """tiny_run(name) runs configs/<name>.py at size=tiny on phantoms once per session."""
  done: dict[str, pathlib.Path] = {}

  def run(name: str) -> pathlib.Path:
    if name not in done:
      from medrep_jax.train import pipeline, trainer
      config = tiny_config(name)
      workdir = tmp_path_factory.mktemp(f"tiny_{name}")
      if pipeline.is_pipeline(config):
        pipeline.run_pipeline(config, workdir)
      else:
        trainer.train_and_evaluate(config, workdir)
      done[name] = workdir
    return done[name]

  return run


def one_step(config, devices, tmp_path):
  """Builds the state and runs one train step on a mesh over `devices`."""
  import jax
  from medrep_jax.core import mesh as mesh_lib
  from medrep_jax.data import loader
  from medrep_jax.train import trainer
  t = trainer.Trainer(config, tmp_path, devices=devices)
  ds = loader.train_dataset(t.method.make_source("train"), t.method.transforms("train"),
                            global_batch=config.train.batch_size, seed=0)
  with jax.set_mesh(t.mesh):
    batch = mesh_lib.to_global(ds[0], t.mesh)
    state = t.build_state(batch)
    state, metrics = t._compile_step()(state, batch)  # pylint: disable=protected-access
    return jax.device_get((state.params, state.model_state, metrics))


@pytest.fixture
def torch():
  """torch with one intra-op thread (OpenMP barriers crawl on a loaded 2-core box)."""
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)


def assert_same_step(one, eight, rtol: float = 1e-4, atol: float = 1e-6) -> None:
  """`one_step` results on 1 and on 8 devices agree: a real gradient, the loss, the params."""
  import jax
  import numpy as np
  p1, _, m1 = one
  p8, _, m8 = eight
  assert m1["grad_norm"] > 0
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
