"""What the command lines print: the run's own output, not library chatter (layer 0).

By default the command lines (`main`, `predict`, `evaluate`, `export`, and notebooks that
call `install()`) hide messages of the libraries underneath that a user cannot act on:

- XLA's C++ log lines: the `slow_operation_alarm` ("Constant folding an instruction is
  taking > 1s", "The operation took ...", "Very slow compile?") and the GPU/TPU start-up
  warnings. The C++ minimum log level becomes FATAL (`TF_CPP_MIN_LOG_LEVEL=3`): set in the
  environment before jaxlib loads, or through jaxlib's setter once it has loaded. A real
  failure still reaches the user as a Python exception.
- Python log records below WARNING from other libraries (absl sends INFO to the console:
  orbax's save notes, matplotlib's font cache, JAX's backend notes).
- orbax's warnings, e.g. "Waiting for previous save to complete took ... seconds".
- JAX's "Some donated buffers were not usable" warning (a performance note for developers;
  `benchmarks/guards.py` checks donation).

Records at ERROR and above always print, and so does everything of medrep_jax: the
progress bar, the evaluation lines, our warnings and errors. `--verbose` or
`MEDREP_VERBOSE=1` installs nothing, so every library prints what it prints by default.
A `TF_CPP_MIN_LOG_LEVEL` the user set is kept either way (but not the 1 that `import jax`
sets when it finds none).
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import warnings
from typing import MutableMapping, Sequence

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent) + os.sep
CPP_LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
CPP_QUIET_LEVEL = 3  # absl C++ severities: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL
JAX_DEFAULT_CPP_LEVEL = "1"  # what `import jax` puts in the environment when it is unset
# Libraries whose messages below ERROR are hidden whatever their level.
NOISY_LIBRARIES = ("orbax",)
# Python warnings (the `warnings` module) hidden by message.
NOISY_WARNINGS = (r"Some donated buffers were not usable",)
_TRUE = ("1", "true", "yes", "on")


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
  """`MEDREP_VERBOSE=1`, or `--verbose` on the command line."""
  if os.environ.get("MEDREP_VERBOSE", "").strip().lower() in _TRUE:
    return True
  return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=True",
                   "--verbose=1") for a in (argv if argv is not None else sys.argv))


def _in_library(pathname: str, names: Sequence[str]) -> bool:
  parts = pathlib.PurePath(pathname or "").parts
  return any(name in parts for name in names)


class NoiseFilter(logging.Filter):
  """Passes ERROR and above, and every record of medrep_jax; drops other libraries'
  records below WARNING and the noisy libraries' records below ERROR."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    if record.name.split(".")[0] == "medrep_jax" or \
        (record.pathname or "").startswith(_PACKAGE_DIR):
      return True  # ours, also through the root logger or absl
    if record.levelno < logging.WARNING:
      return False
    return not _in_library(record.pathname, NOISY_LIBRARIES)


_FILTER = NoiseFilter()


def _filtered() -> list[logging.Filterer]:
  """Where the filter goes: the "absl" logger (every `absl.logging` call, orbax's too,
  whatever handler prints it later), the root logger's console handlers, absl's handler
  (put on the root by `absl.app.run`, possibly after `install`) and Python's last resort."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  out = [logging.getLogger("absl"), *logging.getLogger().handlers,
         absl_logging.get_absl_handler()]
  if logging.lastResort is not None:
    out.append(logging.lastResort)
  return out


def _user_cpp_level(environ: MutableMapping[str, str]) -> bool:
  """Whether the user chose the C++ log level (`import jax` sets 1 when it is unset)."""
  value = environ.get(CPP_LEVEL_VAR)
  return value is not None and not (value == JAX_DEFAULT_CPP_LEVEL and "jax" in sys.modules)


def _quiet_cpp(environ: MutableMapping[str, str]) -> None:
  """XLA's C++ log level to FATAL, unless the user chose one."""
  if _user_cpp_level(environ):
    return
  environ[CPP_LEVEL_VAR] = str(CPP_QUIET_LEVEL)  # read when jaxlib loads
  if environ is os.environ and "jaxlib" in sys.modules:  # loaded already: set it directly
    try:
      from jax._src.lib import utils  # pylint: disable=g-import-not-at-top
      utils.absl_set_min_log_level(CPP_QUIET_LEVEL)
    except (ImportError, AttributeError):  # another jaxlib: the variable is all we have
      pass


def install(verbose: bool | None = None,
            environ: MutableMapping[str, str] | None = None) -> bool:
  """Hides library noise (see the module docstring) unless `verbose`.

  Call it early, before JAX starts its backend where possible (the command lines call it
  first thing). Calling it again is harmless.

  Args:
    verbose: show everything; default: `verbose_requested()` (`--verbose`,
      `MEDREP_VERBOSE=1`).
    environ: the environment to set `TF_CPP_MIN_LOG_LEVEL` in (default `os.environ`).

  Returns:
    True when the filter was installed, False when verbose.
  """
  if verbose is None:
    verbose = verbose_requested()
  if verbose:
    return False
  _quiet_cpp(os.environ if environ is None else environ)
  for where in _filtered():
    if _FILTER not in where.filters:
      where.addFilter(_FILTER)
  for pattern in NOISY_WARNINGS:
    warnings.filterwarnings("ignore", message=pattern)
  return True

