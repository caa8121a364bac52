"""Default CPU XLA flags: added once, user settings win, opt-out and version guard."""
import os
import subprocess
import sys

from medrep_jax import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_adds_flag_and_keeps_existing():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  added = xla_flags.apply_cpu_defaults(env, jaxlib_version="0.10.2")
  assert added == list(xla_flags.CPU_DEFAULTS)
  assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
  assert f"{FLAG}=LIBRARY_FUSION_TYPE_REDUCE" in env["XLA_FLAGS"]
  assert xla_flags.apply_cpu_defaults(env, jaxlib_version="0.10.2") == []  # idempotent
  assert env["XLA_FLAGS"].count(FLAG) == 1


def test_user_value_wins():
  env = {"XLA_FLAGS": f"{FLAG}="}
  assert xla_flags.apply_cpu_defaults(env, jaxlib_version="0.10.2") == []
  assert env["XLA_FLAGS"] == f"{FLAG}="


def test_opt_out_and_untested_jaxlib():
  env = {"MEDREP_XLA_DEFAULTS": "0"}
  assert xla_flags.apply_cpu_defaults(env, jaxlib_version="0.10.2") == []
  assert "XLA_FLAGS" not in env
  for version in ("0.9.9", "0.10.1", "0.11.0", "1.0.0"):
    env = {}
    assert xla_flags.apply_cpu_defaults(env, jaxlib_version=version) == [], version
    assert "XLA_FLAGS" not in env
  assert xla_flags.apply_cpu_defaults({}, jaxlib_version="0.10.2.dev20260101") != []


def test_import_sets_flag_before_backend_starts():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MEDREP_XLA_DEFAULTS")}
  code = ("import os, medrep_jax, jax, jax.numpy as jnp; "
          "print(jnp.ones(3).sum()); print(os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  expected = xla_flags.apply_cpu_defaults({})  # [] if this jaxlib is outside the tested range
  for flag in expected:
    assert flag in out
