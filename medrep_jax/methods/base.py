"""The method protocol: the small surface every method exposes to the one trainer.

A method module `medrep_jax/methods/<name>.py` defines `build(config) -> Method`. The trainer
calls, in order: `make_source` / `transforms` (data), `init_state` (under jit, with the
shardings from `state_shardings`), then `train_step` in the loop and `eval_step` +
`evaluate` at eval time. A stage that does not train (sampling, heatmap extraction,
filtering) subclasses `Task` instead: the trainer hands it the whole run via `run(workdir)`.
"""
from __future__ import annotations

import abc
import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from medrep_jax.train import mesh as mesh_lib


@dataclasses.dataclass
class EvalContext:
  """What `Method.evaluate` may need besides the outputs."""
  workdir: pathlib.Path
  step: int
  final: bool
  split: str

  @property
  def figures_dir(self) -> pathlib.Path:
    d = self.workdir / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


class Method(abc.ABC):
  """Base class; subclasses override what is their own."""

  def __init__(self, config):
    self.config = config
    #: The run directory and device mesh, set by the trainer before any other call.
    self.workdir: pathlib.Path | None = None
    self.mesh = None

  # ---- data
  def make_source(self, split: str):
    from medrep_jax.data import registry
    return registry.get_source(self.config.data, split)

  def transforms(self, train: bool) -> list:
    from medrep_jax.data import transforms
    return transforms.build_transforms(self.config.data, train=train)

  # ---- state
  @abc.abstractmethod
  def init_state(self, rng: jax.Array, batch: dict[str, jax.Array]):
    """Builds the TrainState from an RNG and one (global) sample batch."""

  def state_shardings(self, abstract_state, mesh) -> Any:
    """Shardings for every leaf of the state; replicated by default."""
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda _: repl, abstract_state)

  # ---- steps (pure; traced under jit)
  @abc.abstractmethod
  def train_step(self, state, batch: dict[str, jax.Array], rng: jax.Array):
    """One update; returns (new state, dict of scalar metrics)."""

  def eval_step(self, state, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example outputs (leading axis = batch) gathered on the host by the trainer."""
    return {}

  def evaluate_state(self, state, ctx: EvalContext
                     ) -> tuple[dict[str, float], dict[str, str]] | None:
    """An eval that is not a pass over eval data (e.g. sample, then score FD).

    Returns (metrics, figures), or None to use `eval_step` + `evaluate` over the eval split.
    """
    return None

  # ---- host side
  def evaluate(self, outputs: dict[str, np.ndarray], state,
               ctx: EvalContext) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics from the gathered eval outputs, and figures {title: path rel. to workdir}."""
    return {}, {}

  def report_lines(self, workdir: pathlib.Path) -> list[str]:
    """Extra markdown lines for report.md."""
    return []


class Task(abc.ABC):
  """A stage with no train loop (sampling, heatmap extraction, filtering)."""

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def run(self, workdir: pathlib.Path) -> dict[str, float]:
    """Does the work, writes outputs under `workdir`, returns summary metrics."""
