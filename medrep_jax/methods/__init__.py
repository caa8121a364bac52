"""One module per method; each declares its stages once in `STAGES`.

`load_method(config)` resolves `config.method` + `config.stage` to a stage object for the
trainer; `load_trained(workdir)` loads a finished run and rebuilds its model through its
own stage, for every method alike (frozen teachers, feature networks, inference).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pathlib
import pkgutil
from typing import Any

from medrep_jax.config_lib import ConfigError
from medrep_jax.core import runs
from medrep_jax.methods import base

_HELPERS = ("base",)  # modules here that are not methods


def available() -> list[str]:
  """The method names (`config.method` values)."""
  import medrep_jax.methods as pkg  # pylint: disable=g-import-not-at-top
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if not (m.ispkg or m.name.startswith("_") or m.name in _HELPERS
                        or m.name.endswith("_base")))


def _hint(value: str, allowed: list[str]) -> str:
  close = difflib.get_close_matches(value, allowed, n=3)
  return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def stages(method: str) -> dict[str, Any]:
  """The `STAGES` table of a method module (stage name -> class or "module:Class")."""
  names = available()
  if method not in names:
    raise ConfigError(f"unknown method {method!r}.{_hint(method, names)} "
                      f"Available: {', '.join(names)}")
  return importlib.import_module(f"{__name__}.{method}").STAGES


def stage_class(config) -> type[base.Stage]:
  """The class of the stage `config` describes; validates `config.stage`."""
  table = stages(config.method)
  stage = config.get("stage", "")
  if not stage and len(table) == 1:
    stage = next(iter(table))
  if stage not in table:
    raise ConfigError(f"{config.method}: stage={stage!r}.{_hint(stage, list(table))} "
                      f"Expected one of {tuple(table)}")
  entry = table[stage]
  if isinstance(entry, str):
    module, _, name = entry.partition(":")
    entry = getattr(importlib.import_module(f"{__name__}.{module}"), name)
  return entry


def load_method(config, workdir: str | pathlib.Path | None = None, mesh=None) -> base.Stage:
  """Builds the stage `config` describes (`config.method`, and `config.stage` if several)."""
  return stage_class(config)(config, workdir=workdir, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class Trained:
  """A finished run with its model rebuilt: `model.apply(variables, ...)` reproduces it."""
  run: runs.Run
  stage: base.Method

  @property
  def config(self):
    return self.run.config

  @property
  def model(self):
    return self.stage.model

  @property
  def variables(self) -> dict:
    return self.run.variables()


def load_trained(path: str | pathlib.Path, *, method: str | None = None,
                 stage: str | None = None) -> Trained:
  """Loads the run in `path` and rebuilds its model from its saved config.

  Args:
    path: a run workdir (or its checkpoints/ folder).
    method, stage: if given, what the run must be (a clear error otherwise).
  """
  run = runs.load_run(path, method=method, stage=stage)
  built = load_method(run.config, workdir=run.path)
  if not isinstance(built, base.Method):
    raise ValueError(f"{run.path} is a {run.config.method} stage "
                     f"{run.config.get('stage', '')!r} run, which trains no model")
  return Trained(run=run, stage=built)


def feature_net(kind: str, path: str | pathlib.Path, batch_size: int = 64):
  """A feature net for FD/KID and filtering (`eval.feature_nets` kinds): `vae` and
  `encoder` from the run in `path`, `inception` from the weights file `path`."""
  from medrep_jax.eval import feature_nets  # pylint: disable=g-import-not-at-top
  if kind == "inception":
    return feature_nets.make_feature_net(kind, weights_path=path, batch_size=batch_size)
  return feature_nets.make_feature_net(kind, trained=load_trained(path), batch_size=batch_size)
