"""What every workload shares: run options per suite, rows, and the measure-a-config helper.

Suites: ``quick`` (tiny models, seconds each: a smoke test of every code path),
``cpu`` (CI-sized: the DCL-CsTP step at ResNet-50 / 96 px, the rest smaller;
about 10-15 minutes on 2 cores) and ``gpu`` (paper sizes in bf16, MFU against
a measured bf16 matmul peak, PyTorch with bf16 autocast + channels-last +
torch.compile).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from benchmarks import steps, torch_ab

SUITES = ("quick", "cpu", "gpu")

# Timing per suite: untimed calls after compile, seconds of timed calls per
# measurement (iterations are derived from a probe step), iteration bounds, A/B rounds.
TIMING = {
    "quick": dict(warmup=1, budget_s=1.0, min_iters=2, max_iters=3, rounds=2),
    "cpu": dict(warmup=1, budget_s=15.0, min_iters=3, max_iters=20, rounds=3),
    "gpu": dict(warmup=3, budget_s=5.0, min_iters=10, max_iters=100, rounds=5),
}


@dataclasses.dataclass
class Options:
  """How to run the workloads (``benchmarks.run`` fills it from the command line)."""
  suite: str = "cpu"
  dtype: str | None = None  # None: float32 on quick/cpu, bfloat16 on gpu.
  torch: bool = True
  torch_compile: bool | None = None  # None: on CUDA only.
  torch_threads: str = "auto"
  check: bool = False
  seed: int = 0
  peak: Mapping[str, Any] | None = None  # flops.measure_peak() of the compute dtype.
  timing: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.suite not in SUITES:
      raise ValueError(f"suite={self.suite!r}; expected one of {SUITES}")
    self.timing = {**TIMING[self.suite], **self.timing}

  @property
  def compute_dtype(self) -> str:
    return self.dtype or ("bfloat16" if self.suite == "gpu" else "float32")

  def size(self, table: Mapping[str, Any]) -> Any:
    """The entry of a per-suite size table for this suite."""
    return table[self.suite]

  def iters(self, step_s: float) -> int:
    t = self.timing
    return int(min(t["max_iters"], max(t["min_iters"], t["budget_s"] / max(step_s, 1e-9))))


def row(workload: str, point: str, record: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
  """One table row / JSON record: workload name, the measured point, the fields."""
  return {"workload": workload, "point": point, **record, **extra}


def measure_config(config: Any, batch: Mapping[str, np.ndarray], opts: Options, *,
                   analytic: steps.AnalyticFn | None = None,
                   prepare: Callable[[Any], None] | None = None,
                   compare: Callable[[steps.StepBench, dict], Any] | None = None
                   ) -> dict[str, Any]:
  """Builds the trainer's step for ``config``, measures it, returns the record.

  ``compare(bench, record)``, when given, times the step itself (e.g. A/B
  rounds against PyTorch) and returns the JAX timing; otherwise the step is
  timed alone for about ``timing.budget_s`` seconds.
  """
  t = opts.timing
  with steps.built(config, batch, prepare) as bench:
    record = bench.compile()
    record["undonated"] = bench.undonated()
    probe = steps.timed(bench, warmup=max(0, t["warmup"] - 1), iters=1)["median_s"]
    record["probe_s"] = probe
    if compare is not None:
      timing = compare(bench, record)
    else:
      timing = steps.timed(bench, warmup=0, iters=opts.iters(probe))
    model = steps.model_flops(bench, analytic)
    steps.throughput(record, timing, bench.batch_size, model, opts.peak)
    record.update(dtype=str(config.dtype), batch=bench.batch_size, times=timing["times"],
                  compiles=bench.counter["traces"],
                  jit_cache_size=steps.jit_cache_size(bench.step_fn),
                  final_loss=bench.final_loss(),
                  device_peak_bytes=steps.device_peak_bytes())
    if opts.check:
      record["lowered_matmul_dtypes"] = _dtypes(bench)
  return record


def torch_compare(opts: Options, make_factory: Callable[[steps.StepBench, dict], Any], *,
                  count_params: bool = False) -> Callable[[steps.StepBench, dict], Any]:
  """The `compare` hook of `measure_config` for an A/B against a PyTorch step.

  `make_factory(bench, record)` builds the torch step factory of `torch_ab.compare`; the
  rounds alternate it with the JAX step. Without torch (or with `opts.torch` off) the JAX
  step is timed alone. `count_params` records the JAX parameter count first (as
  `record["params"]`, with or without torch) for factories that check the torch model's.
  """
  def compare(bench: steps.StepBench, record: dict) -> Any:
    if count_params:
      record["params"] = sum(leaf.size for leaf in jax.tree.leaves(bench.state.params))
    if not opts.torch or torch_ab.torch_or_none() is None:
      return steps.timed(bench, warmup=0, iters=opts.iters(record["probe_s"]))
    rounds = opts.timing["rounds"]
    jax_timing, fields = torch_ab.compare(
        bench, make_factory(bench, record), batch=bench.batch_size, rounds=rounds,
        iters=torch_ab.iters_per_round(record["probe_s"], opts.timing["budget_s"], rounds),
        threads=opts.torch_threads, torch_compile=opts.torch_compile)
    record.update(fields)
    return jax_timing

  return compare


def _dtypes(bench: steps.StepBench) -> dict[str, Any]:
  """Conv/matmul operand dtypes of the lowered step (FLOP-weighted) and of the compiled one."""
  from benchmarks import guards  # pylint: disable=import-outside-toplevel
  report = guards.matmul_dtypes(bench.lowered.as_text())
  report["f32_ops"] = report["f32_ops"][:10]
  report["compiled"] = guards.compiled_matmul_dtypes(bench.compiled.as_text())
  return report
