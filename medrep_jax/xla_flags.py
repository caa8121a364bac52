"""Default XLA flags that make convolution training faster on CPU.

jaxlib 0.10's XLA:CPU sends every convolution to the YNNPACK library, whose weight gradients
are 2-8x slower than XLA's own kernels (docs/results/benchmarks.md, "Profiling the CPU gap").
`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE` keeps YNNPACK for the
reductions and gives convolutions back to XLA: 1.3-1.9x faster conv steps on CPU with the
same results. GPU and TPU backends ignore the flag.

The flag is added to `XLA_FLAGS` when the package is imported, which is before JAX starts its
backend in every entry point (CLI, tests, notebooks that import medrep_jax first). A flag the
user already set wins, `MEDREP_XLA_DEFAULTS=0` turns the defaults off, and jaxlib versions
outside the tested range get nothing (an unknown flag makes XLA abort).
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE",)
# jaxlib versions known to define every flag in CPU_DEFAULTS.
TESTED_JAXLIB = ((0, 10, 2), (0, 11, 0))


def _version_tuple(text: str) -> tuple[int, ...]:
  parts = []
  for piece in text.split(".")[:3]:
    digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
    parts.append(int(digits))
  return tuple(parts)


def _jaxlib_version() -> str | None:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None,
                       jaxlib_version: str | None = None) -> list[str]:
  """Appends the CPU_DEFAULTS the user has not set to `environ["XLA_FLAGS"]`.

  Args:
    environ: The environment to edit (default `os.environ`).
    jaxlib_version: Overrides the installed jaxlib version (for tests).

  Returns:
    The flags that were added (empty when disabled, unsupported or already set).
  """
  environ = os.environ if environ is None else environ
  if environ.get("MEDREP_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  version = jaxlib_version if jaxlib_version is not None else _jaxlib_version()
  low, high = TESTED_JAXLIB
  if version is None or not low <= _version_tuple(version) < high:
    return []
  flags = environ.get("XLA_FLAGS", "")
  added = [f for f in CPU_DEFAULTS if f.split("=", 1)[0] not in flags]
  if added:
    environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
  return added
