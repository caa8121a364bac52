"""Sweep specs: parse `--sweep 'a.b=[1,2],c=[x,y]'`, validate the keys, expand the runs.

A sweep key is one of two kinds:

- a **variant arg**: a key of the config file's `DEFAULTS` (e.g. `size`, `data`, `seed` in
  `configs/finetune.py`); it goes after the ':' of `--config FILE:args`;
- a **config override**: any other dotted path of the resolved config (e.g. `optim.lr`),
  or a key written with a `config.` prefix (e.g. `config.seed`, to set the field rather
  than the variant arg); it becomes `--config.optim.lr=VALUE`.

Values are Python literals when they parse as such (`1e-3`, `True`, `(16, 32)`), else
strings. Every combination is resolved and every override applied to a copy of the config
before anything runs, so an unknown key or a value of the wrong type fails up front.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import pathlib
import re
import shlex
from typing import Any, Callable

import ml_collections as mlc

from medrep_jax import config_lib

OVERRIDE_PREFIX = "config."
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,@-]")
_MAX_NAME = 180


class SweepError(ValueError):
  """A sweep spec, key or value is invalid."""


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept key (as written: the run-name label and table column) and its values.

  `texts` are the values as they go on a command line.
  """
  key: str
  values: tuple[Any, ...]
  texts: tuple[str, ...]
  override: bool = False

  @property
  def path(self) -> str:
    """The config path of an override (the key without its `config.` prefix)."""
    return self.key[len(OVERRIDE_PREFIX):] if self.key.startswith(OVERRIDE_PREFIX) else self.key


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep: its values (by sweep key), run name and CLI arguments."""
  name: str
  values: dict[str, Any]
  config_arg: str  # FILE[:variant args]
  overrides: tuple[str, ...]  # --config.k=v


def split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits on `sep` outside brackets, parentheses, braces and quotes."""
  parts, depth, quote, cur = [], 0, "", []
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth < 0:
        raise SweepError(f"unbalanced {ch!r} in {text!r}")
    elif ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  if depth or quote:
    raise SweepError(f"unclosed bracket or quote in {text!r}")
  parts.append("".join(cur))
  return [p.strip() for p in parts]


def _value_text(value: Any, raw: str) -> str:
  return value if isinstance(value, str) else raw


def parse_sweep(spec: str) -> list[tuple[str, list[Any], list[str]]]:
  """Parses `'a.b=[1,2],c=[x,y],d=3'` into [(key, values, value texts)], in order.

  Raises:
    SweepError: for a malformed item, an empty list or a repeated key.
  """
  out, seen = [], set()
  for item in split_top_level(spec):
    if not item:
      continue
    if "=" not in item:
      raise SweepError(f"sweep item {item!r} is not key=[v1,v2,...]")
    key, raw = (s.strip() for s in item.split("=", 1))
    if not key or key in seen:
      raise SweepError(f"sweep key {key!r} is empty or repeated in {spec!r}")
    seen.add(key)
    if raw.startswith("[") and raw.endswith("]"):
      raws = [r for r in split_top_level(raw[1:-1]) if r]
    else:
      raws = [raw]
    if not raws:
      raise SweepError(f"sweep key {key!r} has no values")
    values = [config_lib.parse_value(r) for r in raws]  # same parsing as variant args
    out.append((key, values, [_value_text(v, r) for v, r in zip(values, raws)]))
  return out


def load_config_module(config_file: str):
  """Imports a config file by path (the way `--config FILE` does)."""
  path = pathlib.Path(config_file)
  if not path.is_file():
    raise SweepError(f"config file {config_file} not found")
  spec = importlib.util.spec_from_file_location(f"sweep_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SweepError(f"{config_file} has no get_config(arg)")
  return module


def flat_keys(config: mlc.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted leaf path of a config."""
  out = []
  for key, value in config.items():
    if isinstance(value, mlc.ConfigDict):
      out += flat_keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def _suggest(key: str, known: list[str]) -> str:
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  if not close:  # e.g. "lr" -> "optim.lr"
    close = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
  return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _split_config_arg(config_arg: str) -> tuple[str, dict[str, str]]:
  file, _, args = config_arg.partition(":")
  pairs = {}
  for pair in filter(None, (p.strip() for p in args.split(","))):
    key, _, value = pair.partition("=")
    pairs[key.strip()] = value.strip()
  return file, pairs


def _override_pairs(extra: list[str]) -> dict[str, str]:
  """{key: text} of the `--config.KEY=VALUE` items of `extra`."""
  out = {}
  for arg in extra:
    if arg.startswith("--config.") and "=" in arg:
      key, _, text = arg[len("--config."):].partition("=")
      out[key] = text
  return out


def make_axes(config_arg: str, spec: str) -> tuple[list[Axis], Any]:
  """Classifies the sweep keys (variant arg or override); returns (axes, config module)."""
  file, _ = _split_config_arg(config_arg)
  module = load_config_module(file)
  defaults = dict(getattr(module, "DEFAULTS", {}))
  axes = []
  for key, values, texts in parse_sweep(spec):
    override = key.startswith(OVERRIDE_PREFIX) or key not in defaults
    if not override and any("," in t or "=" in t for t in texts):
      raise SweepError(f"variant arg {key!r} cannot take a value with ',' or '=': {texts}")
    axes.append(Axis(key, tuple(values), tuple(texts), override))
  return axes, module


def _run_name(axes: list[Axis], combo: tuple[int, ...]) -> str:
  label = ",".join(f"{a.key}={a.texts[i]}" for a, i in zip(axes, combo))
  name = _UNSAFE.sub("_", label).strip(".") or "run"
  if len(name) <= _MAX_NAME:
    return name
  return f"{name[:_MAX_NAME]}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def _check_config(module, arg: str, overrides: dict[str, str],
                  defaults: dict) -> mlc.ConfigDict:
  """Resolves `get_config(arg)` and applies the overrides to a copy, failing loudly;
  returns that copy."""
  try:
    config = module.get_config(arg)
  except (ValueError, KeyError) as e:  # ConfigError and a preset's own checks
    raise SweepError(f"--config ...:{arg}: {e}") from e
  known = flat_keys(config)
  typed = {}
  for key, text in overrides.items():
    if key not in known:
      hint = _suggest(key, known + sorted(defaults))
      raise SweepError(f"unknown sweep or override key {key!r}: it is neither a variant arg "
                       f"of the config file ({', '.join(sorted(defaults)) or 'none'}) nor a "
                       f"field of the config.{hint}")
    current = config
    for part in key.split("."):
      current = current[part]
    typed[key] = text if isinstance(current, str) else config_lib.parse_value(text)
  try:
    config.update_from_flattened_dict(typed)
  except (TypeError, ValueError, KeyError) as e:
    raise SweepError(f"invalid override value: {e}") from e
  return config


def expand(config_arg: str, spec: str, extra: list[str] = (),
           check: Callable[[mlc.ConfigDict], None] | None = None) -> list[Run]:
  """The cartesian product of the sweep as runs, each validated against the config.

  Args:
    config_arg: `FILE[:variant args]`, as for `--config`.
    spec: the `--sweep` text.
    extra: further CLI arguments for every run (`--config.k=v` ones are validated).
    check: called with every run's resolved config (e.g. the grid selection's check that
      the runs score the validation split); a ValueError it raises names the run.

  Raises:
    SweepError: for a malformed spec, an unknown key, a bad value or clashing run names.
  """
  axes, module = make_axes(config_arg, spec)
  file, base = _split_config_arg(config_arg)
  defaults = dict(getattr(module, "DEFAULTS", {}))
  fixed = _override_pairs(list(extra))
  twice = sorted({a.path for a in axes if a.override} & set(fixed))
  if twice:
    raise SweepError(f"{', '.join(twice)} is both swept and set in --extra; drop one")
  runs, names = [], {}
  for combo in itertools.product(*(range(len(a.values)) for a in axes)):
    args = dict(base)
    overrides = dict(fixed)
    for axis, i in zip(axes, combo):
      if axis.override:
        overrides[axis.path] = axis.texts[i]
      else:
        args[axis.key] = axis.texts[i]
    arg = ",".join(f"{k}={v}" for k, v in args.items())
    config = _check_config(module, arg, overrides, defaults)
    name = _run_name(axes, combo)
    if check is not None:
      try:
        check(config)
      except ValueError as e:
        raise SweepError(f"run {name}: {e}") from e
    if name in names:
      raise SweepError(f"runs {names[name]} and {combo} map to the same directory {name!r}")
    names[name] = combo
    swept = tuple(f"--config.{a.path}={a.texts[i]}" for a, i in zip(axes, combo)
                  if a.override)
    runs.append(Run(name=name, values={a.key: a.values[i] for a, i in zip(axes, combo)},
                    config_arg=f"{file}:{arg}" if arg else file, overrides=swept))
  return runs


def main_args(run: Run, workdir: pathlib.Path, extra: list[str] = ()) -> list[str]:
  """The `medrep_jax.main` flags of one run."""
  return [f"--config={run.config_arg}", f"--workdir={workdir}", *run.overrides, *extra]


def split_extra(text: str | None) -> list[str]:
  """`--extra '--config.a=1 --config.b=2'` as a list of arguments."""
  return shlex.split(text) if text else []
