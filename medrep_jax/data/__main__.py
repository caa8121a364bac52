"""`python -m medrep_jax.data inspect`: what a data config reads, without training.

    python -m medrep_jax.data inspect --config configs/finetune.py:data=busi \
        [--config.data.root=...] [--stage NAME] [--output sheet.png] [--samples 16]
    python -m medrep_jax.data inspect --name image_mask_folder --root /data/polyps \
        [--set mask_dir=labels --set channels=3]

Prints items per split, image/mask pairs, files skipped and why, image sizes, channels,
dtype and value range, mask values, class counts and groups per split, and writes a
contact sheet PNG (default `./inspect_<name>.png`). Errors print one paragraph and exit
with code 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import functools
import logging
import sys

import ml_collections as mlc
from absl import app
from absl import flags
from ml_collections import config_flags

from medrep_jax import config_lib
from medrep_jax import errors
from medrep_jax.data import inspect, registry
from medrep_jax.data.sources import SPLITS, DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A run config file [:variant "
                                          "args]; its `data` is inspected.", lock_config=True)
_STAGE = flags.DEFINE_string("stage", None, "For a pipeline config: the stage whose data to "
                             "inspect (default: the first stage with a data config).")
_NAME = flags.DEFINE_string("name", None, "A data name (preset or generic reader), instead "
                            "of --config.")
_ROOT = flags.DEFINE_string("root", "", "With --name: the data folder (or file).")
_SET = flags.DEFINE_multi_string("set", [], "With --name: a data field, key=value "
                                 "(repeatable).")
_SPLITS = flags.DEFINE_list("splits", list(SPLITS), "The splits to build.")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Records decoded per split for sizes, value "
                                "ranges and masks.")
_OUTPUT = flags.DEFINE_string("output", None, "Contact sheet PNG (default "
                              "./inspect_<name>.png; '' for none).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show Python tracebacks of errors.")

USAGE = ("usage: python -m medrep_jax.data inspect (--config configs/<name>.py[:args] "
         "[--config.data.<field>=<value> ...] | --name <data name> [--root DIR] "
         "[--set field=value ...]) [--output sheet.png] [--samples N] [--splits train,val]")


def _config_data() -> mlc.ConfigDict:
  """The data config of --config (of --stage, or the first stage with one, in a pipeline)."""
  config = _CONFIG.value
  name = flags.FLAGS["config"].config_filename
  if not isinstance(config, mlc.ConfigDict):
    try:
      config.get("data")  # ml_collections' placeholder raises the load error
    except Exception as e:  # pylint: disable=broad-except
      raise config_lib.ConfigError(f"could not load {name}: {' '.join(str(e).split())}") from e
    raise config_lib.ConfigError(f"could not load {name}")
  if "data" in config and not _STAGE.value:
    return config.data
  stages = list(config.get("stages", ()))
  if _STAGE.value:
    if _STAGE.value not in stages:
      raise config_lib.ConfigError(f"--stage={_STAGE.value!r} is not a stage of {name}; "
                                   f"stages: {stages}")
    stages = [_STAGE.value]
  for stage in stages:
    if "data" in config[stage]:
      return config[stage].data
  raise config_lib.ConfigError(f"{name} has no data config (config.data, or a stage's)")


def _named_data() -> mlc.ConfigDict:
  fields = {}
  for item in _SET.value:
    key, sep, value = item.partition("=")
    if not sep:
      raise DataError(f"--set {item!r} is not field=value, e.g. --set mask_dir=labels")
    fields[key.strip()] = config_lib.parse_value(value.strip())
  if _ROOT.value:
    fields["root"] = _ROOT.value
  return registry.data_config(_NAME.value, **fields)


def main(argv) -> None:
  errors.install_sigterm()
  logging.getLogger("absl").setLevel(logging.WARNING)
  with errors.handled(DataError, ValueError, KeyError):
    if argv[1:] != ["inspect"]:
      raise config_lib.ConfigError(f"expected the command 'inspect', got "
                                   f"{' '.join(argv[1:]) or 'nothing'}. {USAGE}")
    has_config = flags.FLAGS["config"].present or _CONFIG.value is not None
    if has_config == bool(_NAME.value):
      raise config_lib.ConfigError(f"give either --config or --name. {USAGE}")
    if not _NAME.value and (_ROOT.value or _SET.value):
      raise config_lib.ConfigError("--root and --set go with --name; with --config use "
                                   "--config.data.root=... and --config.data.<field>=...")
    data = _config_data() if has_config else _named_data()
    unknown = sorted(set(_SPLITS.value) - set(SPLITS))
    if unknown:
      raise DataError(f"--splits: unknown split(s) {unknown}; splits: {list(SPLITS)}")
    output = f"inspect_{data.name}.png" if _OUTPUT.value is None else _OUTPUT.value
    inspect.inspect_data(data, splits=_SPLITS.value, samples=_SAMPLES.value,
                         output=output or None)
  sys.stdout.flush()


def run() -> None:
  app.run(main, flags_parser=functools.partial(errors.parse_flags, usage=USAGE))


if __name__ == "__main__":
  run()
