"""The stage contract: the small surface every stage of every method shows the one trainer.

A method module `medrep_jax/methods/<name>.py` declares its stages once, in `STAGES`
(stage name -> class, or "module:Class" relative to `medrep_jax.methods`, imported lazily);
`medrep_jax.methods.load_method(config)` resolves `config.method` + `config.stage`.

Every stage gets `config`, `workdir` and `mesh` from the trainer and hands back a `Result`
(metrics, figures, report lines); the trainer alone writes metrics.jsonl, report.md and
done.json. A stage that trains subclasses `Method`: the trainer calls `make_source` /
`transforms` (data), `init_state` (under jit, with the shardings of `state_shardings`),
`train_step` in the loop and `eval_step` + `evaluate` (or `evaluate_state`) at eval time.
A stage with no train loop (sampling, heatmaps, filtering, probes) subclasses `Task` and
does its work in `run()`.

A `Method` writes what is its own: `model`, `loss_fn` (or a `train_step` built on
`gradient_step`), and optionally `init_variables` / `init_extras`; the optimizer, the
state construction and the gradient update live here once.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.config_lib import ConfigError
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.core import optim
from medrep_jax.core.state import TrainState
from medrep_jax.data import registry
from medrep_jax.data import transforms as transforms_lib
from medrep_jax.data.sources import SourceInfo


@dataclasses.dataclass
class Result:
  """What a stage (or one evaluation) hands back to the trainer.

  Attributes:
    metrics: scalar metrics by name (no "eval/" prefix).
    figures: {title: path relative to the workdir} for report.md.
    lines: extra markdown lines for report.md.
  """
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  figures: dict[str, str] = dataclasses.field(default_factory=dict)
  lines: list[str] = dataclasses.field(default_factory=list)


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


class Stage(abc.ABC):
  """What every stage has: its config, its run directory and the device mesh."""

  def __init__(self, config, workdir: str | pathlib.Path | None = None, mesh=None):
    self.config = config
    self.workdir = pathlib.Path(workdir) if workdir is not None else None
    self.mesh = mesh

  # ---- data
  def make_source(self, split: str):
    return registry.get_source(self.config.data, split)

  def transforms(self, split: str) -> list:
    """Host-side transforms of `split`'s records: decode, resize, scale (augmentation
    happens on device, in the step)."""
    del split  # the same for every split unless a stage's sources differ
    return transforms_lib.build_transforms(self.config.data)

  @functools.cached_property
  def info(self) -> SourceInfo:
    """The dataset's info (classes, channels, masks): what a finished run recorded in its
    config (`data_info`), so a trained model loads without its data; otherwise read from
    the train split once."""
    recorded = self.config.get("data_info")
    if recorded:
      fields = {f.name for f in dataclasses.fields(SourceInfo)}
      values = {k: v for k, v in dict(recorded).items() if k in fields}
      return SourceInfo(**{**values, "class_names": tuple(values.get("class_names", ()))})
    return registry.get_source(self.config.data, "train").info


  @property
  def channels(self) -> int:
    """Image channels: `data.channels`, or what the data stores when that is 0."""
    return int(self.config.data.get("channels", 0) or 0) or int(self.info.channels)

  # ---- pre-flight: run by `train.pipeline` for every unfinished stage before the first
  # one starts, so that a config that cannot fit its data fails in seconds, not after
  # hours of earlier stages.
  def preflight(self, planned: dict[str, int]) -> dict[str, int]:
    """Checks this stage's config against its data; returns what it will write.

    Args:
      planned: {folder: the most images an earlier, unfinished stage will write there};
        an earlier stage's own workdir maps to 0 (it will exist, its contents unknown).
    Returns:
      {folder: the most images this stage writes there} for the folders later stages
      may read (e.g. a sample stage's images/).
    Raises:
      ConfigError (or DataError): naming the field, the stage's data and the sizes.
    """
    del planned
    return {}


class Task(Stage):
  """A stage with no train loop (sampling, heatmap extraction, filtering, probes)."""

  @abc.abstractmethod
  def run(self) -> Result:
    """Does the work, writes its outputs under `self.workdir`, returns the result."""


def pending(path: str, planned: dict[str, int]) -> bool:
  """Whether `path` does not exist yet and lies in a folder of `planned`."""
  p = pathlib.Path(path)
  if not path or not p.is_absolute() or p.exists():
    return False
  return any(p == pathlib.Path(k) or pathlib.Path(k) in p.parents for k in planned)


class Method(Stage):
  """A stage that trains; subclasses override what is their own."""

  def planned_train_size(self, planned: dict[str, int]) -> int | None:
    """The most training examples this stage will see (the pre-flight's bound): the real
    train split's size; None when its data come from an earlier stage not yet run.
    Stages that add data (synthetic mixing) override it."""
    root = str(self.config.data.get("root", "") or "")
    if pending(root, planned):  # e.g. a sample stage's images/: its planned count
      return planned.get(root) or None
    return len(Stage.make_source(self, "train"))

  def preflight(self, planned: dict[str, int]) -> dict[str, int]:
    """A stage that trains: `check_planned` on the most training examples it will see."""
    t = self.config.get("train")
    if t is None or not (int(t.get("num_steps", 0) or 0) > 0
                         or float(t.get("num_epochs", 0) or 0) > 0):
      return {}
    n = self.planned_train_size(planned)
    if n is not None:
      self.check_planned(n)
    return {}

  def check_planned(self, train_size: int) -> None:
    """The config against `train_size` (an upper bound) training examples: the batch;
    methods add what else must fit (the memory bank)."""
    batch = int(self.config.train.batch_size)
    if train_size < batch:
      raise ConfigError(f"train.batch_size={batch} exceeds the {train_size} training "
                        f"examples of {self.config.data.get('name', 'the data')}; set "
                        f"train.batch_size to at most {train_size}")

  # ---- model and optimizer
  @property
  @abc.abstractmethod
  def model(self) -> nn.Module:
    """The flax module whose parameters `state.params` holds (built once; no data reads
    beyond `self.info`, so it can be rebuilt from a saved config alone)."""

  @functools.cached_property
  def tx(self) -> optax.GradientTransformation:
    """The optimizer of `config.optim` over `config.train.num_steps` steps."""
    return optim.make_optimizer(self.config.optim, int(self.config.train.num_steps))[0]

  # ---- state
  def init_variables(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict:
    """The model's initial variables from one sample batch."""
    return self.model.init(rng, batch["image"], train=False)

  def init_extras(self, rng: jax.Array, batch: dict[str, jax.Array], params,
                  model_state: dict) -> dict:
    """Method-owned state (momentum encoders, EMA, banks); empty by default."""
    return {}

  def init_state(self, rng: jax.Array, batch: dict[str, jax.Array]) -> TrainState:
    """Builds the TrainState from an RNG and one (global) sample batch."""
    variables = dict(self.init_variables(rng, batch))
    params = variables.pop("params")
    return TrainState.create(params=params, tx=self.tx, model_state=variables,
                             extras=self.init_extras(rng, batch, params, variables))

  def state_shardings(self, abstract_state, mesh) -> Any:
    """Shardings for every leaf of the state; replicated by default."""
    repl = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda _: repl, abstract_state)

  def __init__(self, config, workdir: str | pathlib.Path | None = None, mesh=None):
    super().__init__(config, workdir, mesh)
    if type(self).train_step is Method.train_step and not hasattr(self, "loss_fn"):
      raise TypeError(f"{type(self).__name__} must define loss_fn(params, state, batch, rng) "
                      f"-> (loss, aux) or its own train_step")

  # ---- steps (pure; traced under jit)
  def train_step(self, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    """One update; returns (new state, dict of scalar metrics).

    By default one `gradient_step` on the subclass's `loss_fn(params, state, batch, rng)
    -> (loss, aux)` (see `gradient_step` for aux).
    """
    state, metrics, _ = gradient_step(
        state, functools.partial(self.loss_fn, state=state, batch=batch, rng=rng))
    return state, metrics

  def eval_step(self, state, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example outputs (leading axis = batch) gathered on the host by the trainer."""
    return {}

  def evaluate_state(self, state, ctx: EvalContext) -> Result | None:
    """An eval that is not a pass over eval data (e.g. sample, then score FD).

    Returns a Result, or None to use `eval_step` + `evaluate` over the eval split.
    """
    return None

  # ---- inference (`medrep_jax.load(workdir).predict`)
  # Stages that predict (classifiers, segmenters) define the pure, jittable
  # `predict(variables, images (B, H, W, C)) -> {"probs": ...}` (segmenters add
  # "mask": (B, H, W) uint8) and build their `eval_step` on it, so the two cannot drift.

  @property
  def predict_classes(self) -> tuple[str, ...]:
    """The names of what `predict` scores, one per probability column."""
    return tuple(self.info.class_names)

  # ---- host side
  def evaluate(self, outputs: dict[str, np.ndarray], state, ctx: EvalContext) -> Result:
    """Metrics (and figures, at the final eval) from the gathered eval outputs."""
    return Result()


def gradient_step(state: TrainState, loss_fn: Callable[[Any], tuple[jax.Array, dict]]):
  """value_and_grad of `loss_fn(params) -> (loss, aux)`, then one optimizer update.

  `aux` may hold "metrics" (scalars to log), "updates" (new model-state collections,
  e.g. batch_stats) and anything else the caller needs after the update.

  Returns:
    (new state, {"loss", **metrics, "grad_norm"}, aux).
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads, model_state={**state.model_state,
                                                    **aux.get("updates", {})})
  metrics = {"loss": loss, **aux.get("metrics", {}), "grad_norm": optax.tree.norm(grads)}
  return state, metrics, aux


class EMAParams:
  """Mixin for a `Method`: after each step, state.extras["ema"] <- EMA of the params.

  The bias-corrected EMA (the Adam correction, optax.ema(debias=True)), kept directly:
  after update t, ema_t = sum_s w_s params_s with w_s proportional to decay^(t - s),
  normalized over the t updates seen, i.e.
    ema_t = ema_{t-1} + (1 - decay) / (1 - decay^t) * (params_t - ema_{t-1})
  (`optax.incremental_update` with that step size; the first update copies the params).
  A plain EMA started from the initial weights keeps decay^t of them: 13% after 2,000
  steps at decay 0.999, enough for a diffusion model's EMA to predict a shrunken eps
  and sample noise. For t >> 1 / (1 - decay) the two are the same. decay =
  `config.ema_decay`; the method puts the first copy in `extras["ema"]`. Construction
  checks `config.ema_decay` (a ConfigError outside [0, 1)).
  """

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    if not 0.0 <= float(config.ema_decay) < 1.0:
      raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")

  def train_step(self, state, batch, rng):
    state, metrics = super().train_step(state, batch, rng)
    decay = float(self.config.ema_decay)
    t = state.step.astype(jnp.float32)  # updates so far, this one included
    ema = optax.incremental_update(state.params, state.extras["ema"],
                                   step_size=(1.0 - decay) / (1.0 - decay ** t))
    return state.replace(extras={**state.extras, "ema": ema}), metrics
