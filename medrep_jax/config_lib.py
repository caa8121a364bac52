"""Config helpers shared by every file in `configs/`.

A config file defines `get_config(arg: str = "")`. The argument holds comma-separated
`key=value` variant args (e.g. `size=tiny,data=phantoms`); `parse_variant` turns them into
a dict, rejecting unknown keys and values outside their allowed choices with close-match
suggestions. `base_config` returns the fields every run has; a config file fills in the
method's own fields and locks the result, so `--config.a.b=value` overrides of unknown keys
fail with a "Did you mean" message. A pipeline config file composes its sibling files
(`config_module("finetune").finetune_config(...)`) into one `pipeline(stages)` config.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import pathlib
import sys
from types import ModuleType
from typing import Any, Collection, Mapping

import ml_collections as mlc

# The `configs/` folder of a source checkout, beside this package.
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
  """A config, variant argument or override is invalid."""


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _did_you_mean(word: str, options: Collection[Any]) -> str:
  close = difflib.get_close_matches(word, [str(o) for o in options], n=3)
  return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def parse_variant(arg: str | None, defaults: Mapping[str, Any],
                  choices: Mapping[str, Collection[Any]] | None = None) -> dict[str, Any]:
  """Parses `"k1=v1,k2=v2"` into a dict on top of `defaults`.

  Values are Python literals when they parse as such (`3`, `0.5`, `True`), else strings.

  Args:
    arg: the variant args, the text after ':' in `--config FILE:arg`.
    defaults: every known arg and its default value.
    choices: arg name -> allowed values (e.g. `data=registry.PRESETS`). An arg whose
      default is a bool allows True and False.

  Raises:
    ConfigError: for a malformed pair, a key not in `defaults` or a value not in its
      choices (naming the allowed ones, with suggestions).
  """
  out = dict(defaults)
  for pair in (arg or "").split(","):
    pair = pair.strip()
    if not pair:
      continue
    if "=" not in pair:
      raise ConfigError(
          f"variant argument {pair!r} is not key=value; expected e.g. 'size=tiny,data=phantoms'")
    key, value = (s.strip() for s in pair.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"unknown variant argument {key!r}.{_did_you_mean(key, defaults)} "
                        f"Known: {', '.join(sorted(defaults))}")
    out[key] = parse_value(value)
    allowed = (choices or {}).get(key)
    if allowed is None and isinstance(defaults[key], bool):
      allowed = (True, False)
    if allowed is not None and out[key] not in tuple(allowed):
      raise ConfigError(
          f"variant argument {key}={out[key]!r} is not allowed."
          f"{_did_you_mean(str(out[key]), allowed)} Allowed {key} values: "
          f"{', '.join(repr(a) for a in allowed)}")
  return out


def config_module(name: str, directory: str | os.PathLike[str] | None = None) -> ModuleType:
  """Imports the config file `<directory>/<name>.py` once (later calls get the same module).

  `configs/` is not a package: a pipeline config file composes its siblings with
  `config_module("finetune").finetune_config(...)`; code outside `configs/` passes the
  folder, e.g. `config_module("dcl_cstp", config_lib.CONFIG_DIR)`.

  Args:
    name: the file's name without `.py`.
    directory: the folder; default: that of the calling file.

  Raises:
    ConfigError: when the file does not exist.
  """
  if directory is None:
    caller = sys._getframe(1).f_globals.get("__file__")  # pylint: disable=protected-access
    if caller is None:
      raise ConfigError(f"config_module({name!r}): pass the config directory")
    directory = os.path.dirname(caller)
  return _load_file(os.path.realpath(os.path.join(directory, f"{name}.py")))


@functools.cache
def _load_file(path: str) -> ModuleType:
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(
      f"medrep_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def pipeline(stages: Mapping[str, mlc.ConfigDict]) -> mlc.ConfigDict:
  """A pipeline config: `stages` (the run order) and each stage's config under its name."""
  return mlc.ConfigDict({"stages": tuple(stages), **stages})


def base_config(method: str) -> mlc.ConfigDict:
  """The fields every run has. Config files override values, then `lock()`."""
  c = mlc.ConfigDict()
  c.method = method
  c.seed = 0
  c.dtype = "float32"  # "bfloat16": bf16 compute, fp32 params, losses and norm statistics.
  # Activation checkpointing (nn.remat) of residual/conv blocks: less memory, ~1 more forward.
  c.remat = False
  # Warm start: a run workdir, its checkpoints/ folder, or "stage:NAME" inside a pipeline.
  c.init_from = ""
  # Comma-separated "src_prefix:dst_prefix" rules for init_from; "" matches identical paths.
  c.init_from_rules = ""
  c.mesh = mlc.ConfigDict({"data": -1, "model": 1})
  c.distributed = False  # call jax.distributed.initialize() (multi-host runs only)

  c.train = mlc.ConfigDict()
  c.train.batch_size = 32  # global batch, over all devices and hosts
  c.train.num_steps = 1000
  c.train.num_epochs = 0.0  # > 0: num_steps = ceil(num_epochs * train size / batch_size)
  c.train.log_every = 50
  c.train.eval_every = 500  # 0: evaluate only at the end
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.eval_batch_size = 64
  c.train.eval_split = "val"
  c.train.max_eval_examples = 0  # 0: the whole split
  c.train.num_threads = 4  # grain decode threads per process
  c.train.prefetch = 64
  c.train.progress = True

  c.optim = mlc.ConfigDict()
  c.optim.name = "adamw"  # sgd | adam | adamw
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9  # sgd only
  c.optim.b1 = 0.9  # adam/adamw first-moment decay (DRFL's code: 0.5)
  c.optim.nesterov = False
  c.optim.schedule = "cosine"  # constant | cosine | step | constant_linear
  c.optim.warmup_fraction = 0.0
  c.optim.step_boundaries = (0.6, 0.8)  # fractions of num_steps, for schedule="step"
  c.optim.step_factor = 0.1
  c.optim.constant_fraction = 0.5  # constant_linear: full rate for this fraction, then to 0
  c.optim.grad_clip = 0.0  # global-norm clip; 0 disables
  # Gradient accumulation: average k micro-steps of train.batch_size per update (effective
  # batch k * batch_size); see medrep_jax/core/optim.py for what else runs per micro-step.
  c.optim.accumulate_steps = 1
  return c


def set_tiny_train(c: mlc.ConfigDict) -> None:
  """The CPU-test scale every `size=tiny` variant shares: 2 steps of batch 8, small evals."""
  c.optim.lr = 1e-3
  c.train.update(dict(num_epochs=0.0, batch_size=8, num_steps=2, log_every=1, eval_every=0,
                      checkpoint_every=2, eval_batch_size=8, max_eval_examples=16,
                      num_threads=2))


def to_dict(config: mlc.ConfigDict) -> dict:
  """A JSON-friendly plain dict of a config (tuples become lists)."""
  return config.to_dict()
