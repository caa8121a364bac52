"""Command-line entry point.

    python -m medrep_jax.main --config configs/quickstart.py[:size=tiny,data=phantoms] \
        --workdir runs/quickstart [--config.train.num_steps=100]

The config file's `get_config(arg)` receives the text after ':'. Overrides of unknown keys
fail with a "Did you mean" message (locked ml_collections configs). Re-running a command
with the same workdir resumes (or finishes at once if the run is done); a changed config
is refused unless `--allow_config_change`.

Errors a user can fix (a bad config or override, bad data, a held or unwritable workdir,
a changed config, a NaN) print one paragraph and exit with code 2, with no traceback;
`--debug` or `MEDREP_DEBUG=1` shows it. SIGTERM exits with code 143 and a message.

The console shows the run's own output (progress bar, evaluation lines, messages); the
libraries' noise (XLA's C++ alarms, orbax's warnings, INFO logs) is hidden unless
`--verbose` or `MEDREP_VERBOSE=1` (`medrep_jax/quiet.py`).
"""
from __future__ import annotations

import functools
import os
import sys

import ml_collections as mlc
from absl import app
from absl import flags
from ml_collections import config_flags

from medrep_jax import config_lib
from medrep_jax import errors
from medrep_jax import quiet

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file "
                                          "[:variant args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (outputs, checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "(multi-host runs; also enabled by MEDREP_DISTRIBUTED=1).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a run although its config changed; the change "
    "is recorded in WORKDIR/config_history.jsonl.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show Python tracebacks of errors (also "
                           "MEDREP_DEBUG=1).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' log messages (XLA's "
                             "C++ logs, orbax, JAX), hidden by default (also "
                             "MEDREP_VERBOSE=1).")
_LIST = flags.DEFINE_bool("list", False, "Print the configs with their variant args and "
                          "allowed values, the methods and their stages, and the datasets; "
                          "then exit.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (after "
                                  "variant args and --config.* overrides) and exit.")

USAGE = ("usage: python -m medrep_jax.main --config configs/<name>.py[:key=value,...] "
         "[--workdir DIR] [--config.<key>=<value> ...] [--print_config]; "
         "python -m medrep_jax.main --list")


def _loaded_config() -> mlc.ConfigDict:
  """The parsed --config, or a ConfigError when its file could not be loaded."""
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/quickstart.py")
  if isinstance(config, mlc.ConfigDict):
    return config
  name = flags.FLAGS["config"].config_filename
  path = name.split(":", 1)[0]
  if not os.path.exists(path):
    here = sorted(config_lib.CONFIG_DIR.glob("*.py"))
    raise config_lib.ConfigError(
        f"config file {path} not found (relative to {os.getcwd()}). The configs of this "
        f"checkout: {', '.join(os.path.relpath(p) for p in here) or 'none'}")
  try:
    config.get("method")  # ml_collections' placeholder raises the load error
  except Exception as e:  # pylint: disable=broad-except
    raise config_lib.ConfigError(f"could not load {name}: {' '.join(str(e).split())}") from e
  raise config_lib.ConfigError(f"could not load {name}")


def _allowed(values) -> str:
  values = list(values)
  if len(values) > 8:
    return f"one of {len(values)} names (see the datasets below)" if "phantoms" in values \
        else ", ".join(map(str, values[:8])) + ", ..."
  return " | ".join(map(str, values))


def catalog() -> str:
  """The text of `--list`: configs (variant args, defaults, allowed values), methods and
  their stages, datasets."""
  from medrep_jax import methods  # pylint: disable=g-import-not-at-top
  from medrep_jax.data import registry  # pylint: disable=g-import-not-at-top
  lines = [f"Configs ({config_lib.CONFIG_DIR}), as --config configs/<name>.py:key=value,...:"]
  for path in sorted(config_lib.CONFIG_DIR.glob("*.py")):
    module = config_lib.config_module(path.stem, config_lib.CONFIG_DIR)
    lines.append(f"  {path.stem}")
    choices = getattr(module, "CHOICES", {})
    for key, default in getattr(module, "DEFAULTS", {}).items():
      allowed = f"  [{_allowed(choices[key])}]" if key in choices else ""
      lines.append(f"      {key}={default!r}{allowed}")
  lines.append("Methods and their stages (config.method, config.stage):")
  lines += [f"  {m}: {', '.join(methods.stages(m))}" for m in methods.available()]
  lines.append("Datasets (data=<name>; generic readers need --config.data.root):")
  lines.append("  " + ", ".join(registry.PRESETS))
  return "\n".join(lines)


def _run(config, workdir: str) -> None:
  from medrep_jax.core import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value or config.get("distributed", False))

  import jax  # pylint: disable=g-import-not-at-top
  from medrep_jax.train import pipeline, trainer  # pylint: disable=g-import-not-at-top
  print(f"medrep_jax: {jax.process_count()} process(es), {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); workdir {os.path.abspath(workdir)}",
        flush=True)
  allow = _ALLOW_CONFIG_CHANGE.value
  if pipeline.is_pipeline(config):
    pipeline.run_pipeline(config, workdir, allow_config_change=allow)
  else:
    trainer.train_and_evaluate(config, workdir, allow_config_change=allow)
  print(f"Done. Report: {os.path.join(os.path.abspath(workdir), 'report.md')}")


def main(argv) -> None:
  del argv
  errors.install_sigterm()
  quiet.install(_VERBOSE.value or quiet.verbose_requested())  # again: after absl's set-up
  from medrep_jax.data.sources import DataError  # pylint: disable=g-import-not-at-top
  with errors.handled(DataError):
    if _LIST.value:
      print(catalog())
      return
    config = _loaded_config()
    if _PRINT_CONFIG.value:
      print(config)
      return
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(
        os.path.basename(flags.FLAGS["config"].config_filename.split(":", 1)[0]))[0])
    _run(config, workdir)


def run() -> None:
  quiet.install(quiet.verbose_requested())  # before the config files import JAX
  app.run(main, flags_parser=functools.partial(errors.parse_flags, usage=USAGE))


if __name__ == "__main__":
  sys.exit(run())
