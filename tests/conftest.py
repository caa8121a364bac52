"""Shared pytest setup: 8 fake CPU devices and the real-data folder.

XLA flags must be set before jax is imported anywhere, so this file sets them
at import time (pytest imports conftest.py before any test module).
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  # Tests compile many small programs: LLVM -O0 cuts CPU compile time ~2-3x with little
  # runtime cost at test sizes. Subprocesses (CLI tests) inherit it.
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
  """Returns MEDREP_DATA_DIR, else ../shared/data beside the repo, else None."""
  env = os.environ.get("MEDREP_DATA_DIR")
  if env and pathlib.Path(env).is_dir():
    return pathlib.Path(env)
  fallback = REPO_ROOT.parent / "shared" / "data"
  return fallback if fallback.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  d = shared_data_dir()
  if d is None:
    pytest.skip("real data not found: set MEDREP_DATA_DIR or place ../shared/data beside the repo")
  return d
