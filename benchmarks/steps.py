"""A method's real train step, built and jitted exactly as the trainer does, for timing.

``StepBench(config, batch)`` builds a ``Trainer`` in a temporary workdir,
initializes the state with ``Trainer.build_state`` (jitted init with the
method's shardings) and takes the step from ``Trainer._compile_step`` (one
``jax.jit`` with state/batch shardings and the state donated). Nothing of the
step is re-implemented here, so what is timed is what ``medrep_jax.main`` runs.

``benchmarks.workloads.common.measure_config`` then reports: lower and compile
seconds (ahead of time; the executable lands in the jit cache, so later calls
do not compile again), the median step time after warm-up under
``jax.transfer_guard("disallow")``, examples/s, XLA's FLOPs per example, the
analytic model FLOPs per example, achieved FLOP/s and MFU against a measured
matmul peak, the compiled memory, how often the step was traced, and the
donation guards.
"""
from __future__ import annotations

import contextlib
import copy
import pathlib
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

from benchmarks import flops as flops_lib
from benchmarks import guards
from benchmarks import harness
from medrep_jax.methods import load_method
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.train import trainer as trainer_lib

# (method, state, global batch) -> (differentiated forward FLOPs, no-grad forward FLOPs).
AnalyticFn = Callable[[Any, Any, Mapping[str, jax.Array]], tuple[float, float]]


def memory_peak(compiled: Any) -> tuple[dict[str, int] | None, int | None]:
  """(memory_analysis fields, peak bytes): the reported peak, else args + out - alias + temp."""
  mem = harness.memory_bytes(compiled)
  if not mem:
    return mem, None
  return mem, mem.get("peak_memory_in_bytes") or mem.get("total_bytes")


def device_peak_bytes() -> int | None:
  """The allocator's peak bytes in use on device 0 (GPU/TPU), or None (CPU)."""
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return (stats or {}).get("peak_bytes_in_use")


class StepBench:
  """Builds the trainer's step for ``config`` on a synthetic host ``batch``.

  Args:
    config: a complete run config (as ``configs/*.py`` return).
    batch: host arrays of one global batch, as the loader yields them.
    method: an already built method for ``config`` (default: ``load_method``);
      the ``prepare`` hook of a workload can set fields on it first.
    devices: devices of the mesh (default: all).
    abstract: trace only: the batch and the state are ``jax.ShapeDtypeStruct``s (the
      state from ``jax.eval_shape`` of the method's init, as ``Trainer.build_state``
      derives its shardings), so nothing is initialized, compiled or run; ``trace()``
      then traces (and lowers) the step at full size in seconds.
  """

  def __init__(self, config: Any, batch: Mapping[str, np.ndarray], *, method: Any = None,
               devices: Any = None, abstract: bool = False):
    self._tmp = tempfile.TemporaryDirectory(prefix="medrep_bench_")
    self.config = config
    self.method = method if method is not None else load_method(config)
    self.trainer = trainer_lib.Trainer(config, pathlib.Path(self._tmp.name), self.method,
                                       devices=devices)
    self.mesh = self.trainer.mesh
    self.counter = guards.count_traces(self.method)
    with jax.set_mesh(self.mesh):
      if abstract:
        sharding = mesh_lib.batch_sharding(self.mesh)
        self.batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), dict(batch))
        self.state = jax.eval_shape(self.method.init_state, jax.random.key(0), self.batch)
        self.trainer.state_sharding = self.method.state_shardings(self.state, self.mesh)
      else:
        self.batch = mesh_lib.to_global(dict(batch), self.mesh)
        self.state = self.trainer.build_state(self.batch)
      self.step_fn = self.trainer._compile_step()  # pylint: disable=protected-access
    self.metrics = None
    self.batch_size = int(next(iter(batch.values())).shape[0])

  def compile(self) -> dict[str, Any]:
    """Lowers and compiles the step ahead of time; returns the compile fields."""
    hits = harness.compile_cache_counts()["hits"]
    with jax.set_mesh(self.mesh), guards.donation_warnings() as donation:
      res = harness.compile_time(self.step_fn, self.state, self.batch)
    self.lowered, self.compiled = res.lowered, res.compiled
    mem, peak = memory_peak(res.compiled)
    xla = harness.cost_flops(res.compiled)
    out = {"lower_s": res.lower_s, "compile_s": res.compile_s,
           "flops_per_example_xla": None if xla is None else xla / self.batch_size,
           "memory": mem, "memory_peak_bytes": peak, "donation_warnings": donation}
    if jax.config.jax_compilation_cache_dir:  # Loaded from the shared compile cache?
      out["compile_cache_hit"] = harness.compile_cache_counts()["hits"] > hits
    return out

  def trace(self, lower: bool = True) -> dict[str, Any]:
    """Traces (and lowers) the step of an ``abstract`` bench; returns the timing fields."""
    with jax.set_mesh(self.mesh):
      res = harness.trace_time(self.step_fn, self.state, self.batch, lower=lower)
    self.lowered = res.lowered
    return {"trace_s": res.trace_s, "lower_s": res.lower_s}

  def __call__(self) -> Any:
    """One step through the jitted function (the cached executable); threads the state."""
    with jax.set_mesh(self.mesh):
      self.state, self.metrics = self.step_fn(self.state, self.batch)
    return self.metrics

  def with_state(self, state: Any) -> "StepBench":
    """A view of this bench (same trainer, jitted step and batch) stepping ``state``;
    close only the original."""
    other = copy.copy(self)
    other.state, other.metrics = state, None
    return other

  def undonated(self) -> list[str]:
    """Runs one step; the old state's params / opt_state / extras leaves still alive."""
    old = self.state
    harness.sync(self())
    return guards.undonated({"params": old.params, "opt_state": old.opt_state,
                             "extras": old.extras})

  def final_loss(self) -> float | None:
    if self.metrics is None or "loss" not in self.metrics:
      return None
    return float(jax.device_get(self.metrics["loss"]))

  def close(self) -> None:
    self.trainer.checkpointer.close()
    self.trainer.writer.close()
    self._tmp.cleanup()

  def __enter__(self) -> "StepBench":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def timed(fn: Callable[[], Any], *, warmup: int, iters: int) -> dict[str, Any]:
  """``harness.time_fn`` with implicit host<->device transfers disallowed."""
  with jax.transfer_guard("disallow"):
    return harness.time_fn(fn, warmup=warmup, iters=iters)


def throughput(record: dict[str, Any], timing: Mapping[str, Any], batch: int,
               model_flops_per_step: float | None, peak: Mapping[str, Any] | None) -> None:
  """Adds step time, examples/s, model FLOP/s and MFU to ``record``."""
  step_s = timing["median_s"]
  record.update(step_s=step_s, p10_s=timing["p10_s"], p90_s=timing["p90_s"],
                examples_per_sec=batch / step_s)
  if model_flops_per_step:
    record["flops_per_example_analytic"] = model_flops_per_step / batch
    record["model_tflops_per_sec"] = model_flops_per_step / step_s / 1e12
    xla = record.get("flops_per_example_xla")
    if xla:
      record["xla_over_analytic"] = xla / record["flops_per_example_analytic"]
  peak_fps = (peak or {}).get("flops_per_sec")
  record["mfu"] = flops_lib.mfu(model_flops_per_step, step_s, peak_fps)


def model_flops(bench: StepBench, analytic: AnalyticFn | None) -> float | None:
  """The analytic model FLOPs of one step (3 x trained forward + no-grad forward)."""
  if analytic is None:
    return None
  with jax.set_mesh(bench.mesh):
    return flops_lib.train_step_flops(*analytic(bench.method, bench.state, bench.batch))


def jit_cache_size(jitted: Any) -> int | None:
  """Entries in a jitted function's executable cache (1 = compiled once)."""
  size = getattr(jitted, "_cache_size", None)
  return size() if callable(size) else None


@contextlib.contextmanager
def built(config: Any, batch: Mapping[str, np.ndarray], prepare: Callable[[Any], None] | None
          = None, devices: Any = None, abstract: bool = False):
  """``StepBench`` for ``config`` after ``prepare(method)``; closed on exit."""
  method = load_method(config)
  if prepare is not None:
    prepare(method)
  bench = StepBench(config, batch, method=method, devices=devices, abstract=abstract)
  try:
    yield bench
  finally:
    bench.close()
