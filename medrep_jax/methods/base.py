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
import logging
import pathlib
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.config_lib import ConfigError
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.core import optim
from medrep_jax.core import workdir as workdir_lib
from medrep_jax.core.state import TrainState
from medrep_jax.data import loader
from medrep_jax.data import registry
from medrep_jax.data import transforms as transforms_lib
from medrep_jax.data.sources import DataError, SourceInfo

log = logging.getLogger(__name__)


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
    self.check_shapes(planned)
    return {}

  def check_planned(self, train_size: int) -> None:
    """The config against `train_size` (an upper bound) training examples: the batch;
    methods add what else must fit (the memory bank)."""
    batch = int(self.config.train.batch_size)
    if train_size < batch:
      raise ConfigError(f"train.batch_size={batch} exceeds the {train_size} training "
                        f"examples of {self.config.data.get('name', 'the data')}; set "
                        f"train.batch_size to at most {train_size}")

  # ---- pre-flight of the shapes: the model traced on the batch it will be fed
  def abstract_batch(self, planned: dict[str, int]) -> dict[str, jax.ShapeDtypeStruct] | None:
    """The global train batch the trainer will feed this stage, as `ShapeDtypeStruct`s:
    one record of the train source through `transforms("train")` (the loader's own
    mapping), its batch axis set to `train.batch_size`. None when the batch depends on
    an earlier stage not yet run (`shape_inputs_pending`); a stage that can describe its
    batch from its config alone overrides this."""
    if self.shape_inputs_pending(planned):
      return None
    return self.batch_spec(self.make_source("train"))

  def batch_spec(self, source, transforms: list | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch of `source` as `ShapeDtypeStruct`s: its first record through
    `transforms` (default `transforms("train")`) by the loader itself, the batch axis set
    to `train.batch_size`. Decodes one record."""
    tfs = self.transforms("train") if transforms is None else transforms
    ds = loader.train_dataset(source, tfs, global_batch=1,
                              seed=int(self.config.get("seed", 0)),
                              process_index=0, process_count=1)
    batch = int(self.config.train.batch_size)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (batch, *np.shape(x)[1:]), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)), ds[0])

  def shape_inputs_pending(self, planned: dict[str, int]) -> list[str]:
    """The config fields (dotted) naming paths that an earlier, unfinished stage will
    write: the data root, a frozen teacher or VAE run, ... (`init_from` is left out: the
    warm start comes after the state is built)."""
    flat = _flat_strings(self.config)
    return [k for k, v in flat.items() if k != "init_from" and pending(v, planned)]

  def check_shapes(self, planned: dict[str, int]) -> None:
    """Traces `init_state` abstractly (`jax.eval_shape`: no FLOPs, no memory) on the batch
    of `abstract_batch`, so an image size the network cannot take (a stride that does not
    divide it, a patch size, a crop larger than the image) fails now as a ConfigError
    naming the stage's size and model fields, not inside the stage.

    Not traced (a log line) when the batch depends on an earlier stage not yet run, or
    when reading it raises a DataError / FileNotFoundError (an input another run writes:
    the stage reports it itself when it starts).

    Raises:
      ConfigError: tracing raised a ValueError, TypeError or ArithmeticError (a shape
        mismatch, a feature map shrunk to nothing).
    """
    name = type(self).__name__
    try:
      batch = self.abstract_batch(planned)
    except (DataError, FileNotFoundError) as e:  # inputs another run writes (crops, a
      # teacher's targets) not there yet: the stage itself reports them when it starts
      log.info("pre-flight: %s's shapes are not traced: its train batch cannot be read "
               "yet (%s)", name, e)
      return
    if batch is None:
      log.info("pre-flight: %s's shapes are not traced: its inputs come from earlier "
               "stages not yet run (%s)", name, ", ".join(self.shape_inputs_pending(planned)))
      return
    error = self.shape_error(batch)
    if error is not None:
      raise ConfigError(self._shape_message(batch, error))

  def shape_error(self, batch: dict[str, jax.ShapeDtypeStruct]) -> Exception | None:
    """The ValueError / TypeError / ArithmeticError that tracing `init_state` on `batch`
    raises, or None."""
    key = self._trace_key(batch)
    if key in _TRACED:
      return None
    try:
      jax.eval_shape(self.init_state, jax.random.key(0), batch)
    except (ConfigError, DataError):  # already worded for the user
      raise
    except (ValueError, TypeError, ArithmeticError) as e:  # lax / flax shape checks, the
      return e  # models' own; a feature map shrunk to size 0 (a division by zero)
    _TRACED.add(key)
    return None

  def _trace_key(self, batch: dict[str, jax.ShapeDtypeStruct]) -> str:
    """What decides a trace: the stage class, its model (the module's repr holds every
    attribute), its config less the absolute paths (another run's workdir traces alike)
    and the batch's shapes; the check of a pipeline runs it once per distinct stage."""
    flat = {k: v for k, v in _flat_leaves(self.config).items()
            if k != "init_from" and not (isinstance(v, str) and v.startswith("/"))}
    spec = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())
    return repr((type(self).__qualname__, repr(self.model), sorted(flat.items()), spec))

  def _fits(self, batch: dict[str, jax.ShapeDtypeStruct]) -> bool:
    """Whether `init_state` traces on `batch` (a probe of the size hint)."""
    try:
      return self.shape_error(batch) is None
    except (ConfigError, DataError):
      return False

  def size_multiple(self, error: Exception) -> int | None:
    """The multiple the image size must be, when known: by default read from the model's
    error ("divisible by N", "a multiple of N"); a stage may override it with its model's
    total stride."""
    found = re.findall(r"(?:divisible by|multiple of)\s+(\d+)", str(error))
    return int(found[-1]) if found else None

  def _shape_message(self, batch: dict[str, jax.ShapeDtypeStruct], error: Exception) -> str:
    """One paragraph: the fields, the batch, the model's error and the sizes that trace."""
    fields = ", ".join(f"{k}={v!r}" for k, v in _size_fields(self.config).items())
    leaves = {k: v for k, v in batch.items() if len(getattr(v, "shape", ())) >= 3}
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in (leaves or batch).items()
                       if hasattr(v, "shape"))
    what = " ".join(str(error).split())
    if isinstance(error, ArithmeticError):
      what += " (a feature map shrinks to size 0: the network downsamples more than the " \
              "image allows)"
    message = (f"this stage's model cannot be built on the train batch it will be fed "
               f"({shapes}, from {fields}): {type(error).__name__}: {what}")
    return message + self._size_hint(batch, error)

  def _size_hint(self, batch: dict[str, jax.ShapeDtypeStruct], error: Exception) -> str:
    """"; ... set data.image_size to 32 or 40": the nearest sizes that trace, among the
    multiples of `size_multiple` (or, when unknown, of the powers of two); at most
    `_MAX_PROBES` more traces, on the failure path only."""
    size = (self.config.get("data") or {}).get("image_size")
    if not isinstance(size, int) or size <= 0:
      return ""
    multiple = self.size_multiple(error)
    valid = []
    for c in _candidate_sizes(size, multiple)[:_MAX_PROBES]:
      if self._fits(_resized(batch, size, c)):
        valid.append(c)
        if len(valid) == 2:
          break
    if not valid:  # another size does not help: the error is not about the size
      return ""
    rule = f"data.image_size must be a multiple of {multiple}" if multiple else ""
    sizes = " or ".join(map(str, sorted(valid)))
    return f"; {rule}: set it to {sizes}" if rule else f"; sizes that fit: {sizes}"

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


# Model fields named in a shape error: what sets a network's strides and patches.
_SIZE_WORDS = ("encoder", "arch", "width", "level", "depth", "patch", "stride", "factor",
               "size", "crop", "scale")


_MAX_PROBES = 6  # traces spent looking for valid image sizes once one has failed


def _candidate_sizes(size: int, multiple: int | None) -> list[int]:
  """Image sizes near `size` to try, nearest first: the multiples of `multiple` around it,
  else its neighbouring multiples of 2, 4, ..., 256 (a network's total stride is a power
  of two; those of the deeper strides also reach a network deeper than the image)."""
  if multiple:
    near = [(size // multiple + k) * multiple for k in range(-2, 4)]
  else:
    near = [c for m in (2 ** k for k in range(1, 9))
            for c in ((size // m) * m, -(-size // m) * m)]
  return sorted({c for c in near if c > 0 and c != size}, key=lambda c: (abs(c - size), c))


# The shape traces that passed (`Method._trace_key`), so identical stages trace once.
_TRACED: set[str] = set()


def _flat_leaves(config) -> dict[str, Any]:
  """{dotted key: value} of the leaves of a config (`core.workdir.flatten`)."""
  return workdir_lib.flatten(config.to_dict())


def _flat_strings(config) -> dict[str, str]:
  """{dotted key: value} of the string leaves of a config."""
  return {k: v for k, v in _flat_leaves(config).items() if isinstance(v, str)}


def _size_fields(config) -> dict[str, Any]:
  """The config fields a shape error names: the data sizes and the model's size fields."""
  out = {}
  data = config.get("data") or {}
  for key in ("image_size", "volume_size", "crop_size", "patch_size"):
    if key in data and data[key] not in ((), None, "", 0):
      out[f"data.{key}"] = data[key]
  model = config.get("model") or {}
  for key in model.keys():
    value = model[key]
    if (any(w in key for w in _SIZE_WORDS) and not isinstance(value, bool)
        and isinstance(value, (int, str, tuple, list))):
      out[f"model.{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def _resized(batch: dict[str, jax.ShapeDtypeStruct], old: int, new: int):
  """`batch` with every spatial axis of length `old` set to `new` (not the batch axis,
  nor the channel axis of an image)."""
  def one(x):
    if not hasattr(x, "shape"):
      return x
    last = len(x.shape) - 1 if len(x.shape) >= 4 else len(x.shape)
    shape = [new if 0 < i < last and d == old else d for i, d in enumerate(x.shape)]
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
  return jax.tree.map(one, batch, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


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
