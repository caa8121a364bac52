"""What every workload shares: run options per suite, rows, and the measure-a-config helper.

Suites: ``quick`` (tiny models, seconds each: a smoke test of every code path),
``cpu`` (CI-sized: the DCL-CsTP step at ResNet-50 / 96 px, the rest smaller;
about 10-15 minutes on 2 cores) and ``gpu`` (paper sizes in bf16, MFU against
a measured bf16 matmul peak, PyTorch with bf16 autocast + channels-last, eager
and torch.compile; timed briefly, since a lent GPU's time goes to compiling:
docs/results/benchmarks.md, "GPU suite: dry run and time budget").

Two modes check a suite without timing it (``benchmarks.run --dry-run``):
``Options(dry_run=True)`` runs the suite's code path (its dtype, step functions, guards
and torch setups) at the quick suite's tiny shapes on one device, one call per
measurement; ``Options(abstract=True)`` traces each step at the suite's real shapes (and
with ``check`` lowers it) without compiling or running it, and estimates its GPU step time
from the analytic FLOPs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from benchmarks import harness, steps, torch_ab

SUITES = ("quick", "cpu", "gpu")

# Timing per suite: untimed calls after compile, seconds of timed calls per
# measurement (iterations are derived from a probe step), iteration bounds, A/B rounds.
TIMING = {
    "quick": dict(warmup=1, budget_s=1.0, min_iters=2, max_iters=3, rounds=2),
    "cpu": dict(warmup=1, budget_s=15.0, min_iters=3, max_iters=20, rounds=3),
    "gpu": dict(warmup=2, budget_s=2.0, min_iters=5, max_iters=50, rounds=3),
}
DRY_RUN_TIMING = dict(warmup=0, budget_s=0.0, min_iters=1, max_iters=1, rounds=1)
# At least this many alternating rounds for the bank-growth ratio of dcl_cstp_bank.
BANK_ROUNDS = 5
# The GPU step time an abstract (--dry-run) row estimates: analytic FLOPs over this
# share of an H100 SXM's dense bf16 peak (989 TFLOP/s, datasheet).
H100_BF16_FLOPS = 989e12
ASSUMED_MFU = 0.35


@dataclasses.dataclass
class Options:
  """How to run the workloads (``benchmarks.run`` fills it from the command line)."""
  suite: str = "cpu"
  dtype: str | None = None  # None: float32 on quick/cpu, bfloat16 on gpu.
  torch: bool = True
  torch_compile: bool | None = None  # None: on, except at --quick and in dry runs.
  torch_threads: str = "auto"
  check: bool = False
  seed: int = 0
  peak: Mapping[str, Any] | None = None  # flops.measure_peak() of the compute dtype.
  timing: dict[str, Any] = dataclasses.field(default_factory=dict)
  dry_run: bool = False  # The suite's code path at the quick suite's sizes, one call each.
  abstract: bool = False  # Trace and lower at the suite's sizes; compile and run nothing.
  # Where the torch.compile A/B rounds go when they are put off to the end of the run
  # (``benchmarks.run`` under a deadline): ``DeferredCompile`` jobs; None runs them in the
  # workload, right after the eager rounds.
  deferred: list[Any] | None = None

  def __post_init__(self):
    if self.suite not in SUITES:
      raise ValueError(f"suite={self.suite!r}; expected one of {SUITES}")
    self.timing = {**TIMING[self.suite], **(DRY_RUN_TIMING if self.dry_run else {}),
                   **self.timing}

  @property
  def compile_torch(self) -> bool:
    """Whether the A/B rounds include ``torch.compile`` (default: yes, except at --quick
    and in dry runs, where compiling each reference would take minutes on a CPU)."""
    if self.torch_compile is not None:
      return self.torch_compile
    return self.suite != "quick" and not self.dry_run

  @property
  def torch_notes(self) -> list[str]:
    """Why the A/B rounds leave a reference out (``torch_notes`` of a row)."""
    if self.compile_torch:
      return []
    if self.torch_compile is False:
      return ["torch.compile skipped (--no-torch-compile)"]
    return [f"torch.compile not run {'in a dry run' if self.dry_run else 'at --quick'} "
            f"(--torch-compile runs it)"]

  @property
  def torch_gpu_setups(self) -> bool | None:
    """The GPU suite's torch setups (bf16 autocast + channels-last) also on CPU in its dry
    run; otherwise None (they follow the device)."""
    return True if self.dry_run and self.suite == "gpu" else None

  def devices(self) -> Any:
    """The mesh devices: all (None), or one in dry runs, as the one GPU the suite targets
    (the dry run's tiny batches need not divide a test's 8 fake devices)."""
    return jax.devices()[:1] if self.dry_run or self.abstract else None

  @property
  def compute_dtype(self) -> str:
    return self.dtype or ("bfloat16" if self.suite == "gpu" else "float32")

  def size(self, table: Mapping[str, Any]) -> Any:
    """The entry of a per-suite size table for this suite (quick's in a dry run)."""
    return table["quick" if self.dry_run else self.suite]

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
  timed alone for about ``timing.budget_s`` seconds. With ``opts.abstract`` the step is
  only traced, and lowered with ``opts.check`` (``abstract_record``).
  """
  t = opts.timing
  with steps.built(config, batch, prepare, devices=opts.devices(),
                   abstract=opts.abstract) as bench:
    if opts.abstract:
      record = bench.trace(lower=opts.check)
      record["compiles"] = bench.counter["traces"]
      return abstract_record(record, steps.model_flops(bench, analytic), bench.batch_size,
                             str(config.dtype), opts, bench.lowered)
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
      record["lowered_matmul_dtypes"] = _dtypes(bench.lowered, bench.compiled)
  return record


def abstract_record(record: dict[str, Any], model_flops_per_step: float | None, batch: int,
                    dtype: str, opts: Options, lowered: Any) -> dict[str, Any]:
  """The record of a step traced at full size (``Options.abstract``): trace (and, with
  ``opts.check``, lowering) seconds, the analytic FLOPs and the H100 step time they imply
  at ``ASSUMED_MFU`` (an estimate for planning a GPU run, not a measurement), and with
  ``opts.check`` the lowered program's conv/matmul dtypes."""
  record.update(abstract=True, batch=batch, dtype=dtype)
  if model_flops_per_step:
    est = model_flops_per_step / (H100_BF16_FLOPS * ASSUMED_MFU)
    record.update(flops_per_step_analytic=model_flops_per_step,
                  flops_per_example_analytic=model_flops_per_step / batch,
                  est_h100_step_s=est, est_h100_examples_per_sec=batch / est,
                  est_assumed_mfu=ASSUMED_MFU)
  if opts.check:
    record["lowered_matmul_dtypes"] = _dtypes(lowered)
  return record


def abstract_fn(opts: Options, jitted: Any, *args: Any) -> tuple[dict[str, Any], Any]:
  """({trace_s, lower_s}, lowered) of a jitted function (a sampler) traced for ``args``,
  and lowered with ``opts.check``."""
  res = harness.trace_time(jitted, *args, lower=opts.check)
  return {"trace_s": res.trace_s, "lower_s": res.lower_s}, res.lowered


def torch_compare(opts: Options, make_factory: Callable[[steps.StepBench, dict], Any], *,
                  count_params: bool = False) -> Callable[[steps.StepBench, dict], Any]:
  """The `compare` hook of `measure_config` for an A/B against a PyTorch step.

  `make_factory(bench, record)` builds the torch step factory of `torch_ab.compare`; the
  rounds alternate it with the JAX step, eager and (`opts.compile_torch`) compiled.
  Without torch (or with `opts.torch` off) the JAX step is timed alone and
  `record["torch_notes"]` says why. `count_params` records the JAX parameter count first
  (as `record["params"]`, with or without torch) for factories that check the torch
  model's.
  """
  def compare(bench: steps.StepBench, record: dict) -> Any:
    if count_params:
      record["params"] = sum(leaf.size for leaf in jax.tree.leaves(bench.state.params))
    skip = torch_skipped(opts)
    if skip:
      record["torch_notes"] = [skip]
      return steps.timed(bench, warmup=0, iters=opts.iters(record["probe_s"]))
    rounds = opts.timing["rounds"]
    factory = make_factory(bench, record)
    ab = dict(batch=bench.batch_size, rounds=rounds,
              iters=torch_ab.iters_per_round(record["probe_s"], opts.timing["budget_s"], rounds),
              threads=opts.torch_threads, gpu=opts.torch_gpu_setups)
    defer = opts.compile_torch and opts.deferred is not None
    jax_timing, fields = torch_ab.compare(
        bench, factory, torch_compile=opts.compile_torch and not defer,
        notes=opts.torch_notes, **ab)
    record.update(fields)
    if defer:  # The bench (state, executable) stays alive until the job has run.
      job = DeferredCompile(len(opts.deferred), lambda: torch_ab.compare(
          bench, factory, kinds=("compile",), **ab)[1])
      opts.deferred.append(job)
      record["torch_deferred"] = job.index
    return jax_timing

  return compare


@dataclasses.dataclass
class DeferredCompile:
  """The torch.compile A/B rounds of one row, put off to the end of the run.

  ``run()`` returns the row's new torch fields (``torch_ab.compare(..., kinds=("compile",))``);
  ``torch_ab.merge`` adds them to the row whose ``torch_deferred`` is ``index``.
  """
  index: int
  run: Callable[[], dict[str, Any]]


def torch_skipped(opts: Options) -> str | None:
  """Why no PyTorch reference runs (None when they do)."""
  if not opts.torch:
    return "torch A/B skipped (--no-torch)"
  if torch_ab.torch_or_none() is None:
    return "torch A/B skipped: torch is not installed (the [bench] extra)"
  return None


def _dtypes(lowered: Any, compiled: Any = None) -> dict[str, Any]:
  """Conv/matmul operand dtypes of the lowered step (FLOP-weighted) and of the compiled one."""
  from benchmarks import guards  # pylint: disable=import-outside-toplevel
  report = guards.matmul_dtypes(lowered.as_text())
  report["f32_ops"] = report["f32_ops"][:10]
  if compiled is not None:
    report["compiled"] = guards.compiled_matmul_dtypes(compiled.as_text())
  return report
