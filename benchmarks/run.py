"""The benchmark suite: one table and one JSON record for every workload.

    python -m benchmarks.run --suite cpu|gpu [--only NAME[,NAME...]] [--check]
        [--json PATH] [--quick] [--dry-run] [--dtype float32|bfloat16] [--no-torch]
        [--torch-compile | --no-torch-compile] [--torch-threads N|auto] [--single-thread]
        [--deadline-s S] [--list]

``--quick`` (= ``--suite quick``) runs every workload at tiny size, a smoke
test (compiled at LLVM -O0 unless XLA_FLAGS sets a level: its times are not
benchmarks). ``--check`` also evaluates the regression guards on what was measured
(each step traced once, state donated without "donated buffers were not
usable" warnings, no implicit transfers while timing, flat step time as the
bank grows 16x, bf16 operands of every conv and ~all matmuls in bf16 mode)
and exits 1 when one fails. ``--dry-run`` checks a suite without timing it, on
any machine: each workload runs the suite's code path (dtype, step functions,
guards, torch setups) compiled and called once at the quick suite's tiny shapes
on one device, then is traced (lowered with ``--check``) at the suite's real shapes
(nothing compiled), with the analytic FLOPs and an H100 step-time estimate; rows are
marked ``dry_run``; the gpu suite's dry run also prints an estimate of the real call.
Every A/B row reports ``speedup_vs_torch_eager`` and ``speedup_vs_torch_compile``.

``--suite gpu`` fits one call of at most 8 minutes: ``--deadline-s`` defaults to
``GPU_DEADLINE_S``, the torch.compile rounds run after every workload (each only while the
deadline allows), and the workloads share a compile cache (``--compile-cache``).
Workloads: ``--list``; sizes and fields: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from benchmarks import flops, guards, harness, torch_ab
from benchmarks import workloads
from benchmarks.workloads.common import (ASSUMED_MFU, BANK_ROUNDS, TIMING, Options,
                                         SUITES)

COLUMNS = [("workload", "workload"), ("point", "point"), ("step_s", "step s"),
           ("examples_per_sec", "ex/s"), ("compile_total_s", "compile s"),
           ("gflop_xla", "GFLOP/ex XLA"), ("gflop_analytic", "GFLOP/ex model"),
           ("memory_mib", "mem MiB"), ("mfu", "MFU"),
           ("torch_eager", "speedup_vs_torch_eager"),
           ("torch_compile", "speedup_vs_torch_compile"), ("compiles", "traces"),
           ("note", "note")]
BF16_FRACTION = 0.99
DRY_RUN_NOTES = {"tiny": "dry run: compiled and run at tiny size",
                 "traced": "dry run: traced at full size, not compiled"}


# --suite gpu's default --deadline-s: one call of the lent GPU is at most 8 minutes; what
# is left (~30 s) covers the end of the last workload, the table and the JSON.
GPU_DEADLINE_S = 450.0
# What one deferred torch.compile A/B is assumed to take before one has been measured
# (its first two calls compile; docs/results/benchmarks.md assumes 40-90 s on a GPU).
TORCH_COMPILE_EST_S = 90.0


# The backend-chosen code paths, as on a GPU ("auto" takes XLA's own convolution weight
# gradient and transposed conv off the CPU backend): the GPU suite's dry run traces and
# compiles the programs a GPU would run.
GPU_PATHS = {"MEDREP_CONV_WEIGHT_GRAD": "xla", "MEDREP_CONV_TRANSPOSE": "xla"}


@contextlib.contextmanager
def gpu_code_paths(enabled: bool):
  """Sets GPU_PATHS in the environment (where unset) while the block runs (``enabled``);
  yields the values in effect, or None."""
  if not enabled:
    yield None
    return
  saved = {k: os.environ.get(k) for k in GPU_PATHS}
  for k, v in GPU_PATHS.items():
    os.environ.setdefault(k, v)
  try:
    yield {k: os.environ[k] for k in GPU_PATHS}
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)


@contextlib.contextmanager
def compile_cache(spec: str | None, suite: str):
  """Shares compiled programs between the run's workloads (``harness.use_compile_cache``):
  in ``spec`` (a directory, kept), or for the gpu suite by default (``spec`` None) in a
  temporary one removed on exit; "off", or None on the quick and cpu suites, leaves JAX's
  settings alone. Yields the directory or None; restores the settings on exit."""
  if spec == "off" or (spec is None and suite != "gpu"):
    yield None
    return
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache
  import jax  # pylint: disable=import-outside-toplevel
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  tmp = None if spec else tempfile.mkdtemp(prefix="medrep_jax_cache_")
  path = spec or tmp
  harness.use_compile_cache(path)
  compilation_cache.reset_cache()  # JAX decides once per process whether to use a cache.
  try:
    yield path
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--suite", default="cpu", choices=SUITES)
  p.add_argument("--quick", action="store_true", help="same as --suite quick")
  p.add_argument("--only", default="", help="comma-separated workload names")
  p.add_argument("--check", action="store_true", help="evaluate the guards; exit 1 on failure")
  p.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="compute dtype (default: float32 on quick/cpu, bfloat16 on gpu)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch A/B rounds")
  p.add_argument("--dry-run", action="store_true",
                 help="compile and run each workload once at tiny size, then trace it at the "
                      "suite's size (no timing): the suite works before a GPU is lent")
  p.add_argument("--torch-compile", default=None, action=argparse.BooleanOptionalAction,
                 help="also time torch.compile (default: on, except at --quick and "
                      "--dry-run)")
  p.add_argument("--torch-threads", default="auto", help="torch CPU threads: N or auto")
  p.add_argument("--single-thread", action="store_true",
                 help="pin to one core, single-threaded XLA and torch: a per-core comparison "
                      "that a loaded machine disturbs less")
  p.add_argument("--deadline-s", type=float, default=None,
                 help="start no workload that could end past this many seconds (elapsed + "
                      "the longest workload so far); the rest are recorded as skipped. The "
                      "torch.compile A/B rounds then run after every workload, each only if "
                      "the time left covers it. The JSON is rewritten after every workload, "
                      "so a killed run keeps its rows. Default: "
                      f"{GPU_DEADLINE_S:g} on --suite gpu (not in a dry run), else none; "
                      "'inf' for none")
  p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                 help="share compiled programs between the workloads of the run (JAX's "
                      "persistent compilation cache in DIR, kept for later runs; default for "
                      "--suite gpu: a temporary directory, removed at the end; off otherwise)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--list", action="store_true", help="list the workloads and exit")
  args = p.parse_args(argv)
  if args.deadline_s is None and args.suite == "gpu" and not (args.quick or args.dry_run):
    args.deadline_s = GPU_DEADLINE_S
  if args.deadline_s is not None and math.isinf(args.deadline_s):
    args.deadline_s = None
  return args


def display(row: dict[str, Any]) -> dict[str, Any]:
  """The derived table columns of one row."""
  out = dict(row)
  if "compile_s" in row:
    out["compile_total_s"] = row.get("lower_s", 0.0) + row["compile_s"]
  for key, col in (("flops_per_example_xla", "gflop_xla"),
                   ("flops_per_example_analytic", "gflop_analytic")):
    if row.get(key):
      out[col] = row[key] / 1e9
  if row.get("memory_peak_bytes"):
    out["memory_mib"] = row["memory_peak_bytes"] / 2 ** 20
  for kind in torch_ab.KINDS:
    out[f"torch_{kind}"] = torch_ab.summary(row.get(f"speedup_vs_torch_{kind}"))
  notes = [DRY_RUN_NOTES[row["dry_run"]]] if row.get("dry_run") else []
  if "bank_step_ratio" in row:
    notes.append(f"K ratio {row['bank_step_ratio']:.3f} "
                 f"(fastest {row['bank_step_ratio_fastest']:.3f})")
  if row.get("compile_cache_hit"):
    notes.append("compiled program loaded from the shared compile cache")
  if row.get("same_program_as"):
    notes.append(f"same program as {row['same_program_as']} (compiled once)")
  if row.get("est_h100_step_s"):
    notes.append(f"est. H100 {row['est_h100_step_s'] * 1e3:.3g} ms/step at "
                 f"{row['est_assumed_mfu']:.0%} MFU")
  notes += row.get("torch_notes", [])
  if "skipped" in row:
    notes.append(row["skipped"])
  out["note"] = "; ".join(notes) or None
  if "error" in row:
    out["point"] = f"ERROR: {row['error']}"
  return out


def row_checks(row: dict[str, Any], platform: str = "cpu") -> list[dict[str, Any]]:
  """Guard results of one measured row (``platform``: where it ran)."""
  name = f"{row['workload']} [{row['point']}]"
  if "error" in row:
    return [guards.check(f"{name}: ran", False, row["error"])]
  if "skipped" in row:
    return []
  out = []
  if "times" in row:  # Timed (not a trace-only dry-run row).
    out.append(guards.check(f"{name}: no implicit transfers while timing", True,
                            "timed under jax.transfer_guard('disallow')"))
  if "compiles" in row:
    # The bank sweep compiles two shapes in one bench (a dry run traces them apart).
    expected = 2 if "bank_size" in row and not row.get("abstract") else 1
    out.append(guards.check(f"{name}: step traced once per shape",
                            row["compiles"] == expected, f"traces={row['compiles']}"))
  if "donation_warnings" in row:
    out.append(guards.check(f"{name}: donation usable", not row["donation_warnings"],
                            "; ".join(row["donation_warnings"]) or "no warning"))
  if "undonated" in row:
    out.append(guards.check(f"{name}: params/opt_state/extras donated", not row["undonated"],
                            ", ".join(row["undonated"][:5]) or "all consumed"))
  if "bank_flat" in row:  # None at --quick size: reported, not judged.
    out.append(guards.check(
        f"{name}: step time flat as K grows 16x", row["bank_flat"],
        f"median per-round ratio {row['bank_step_ratio']:.3f} (tolerance "
        f"{row['bank_flat_tolerance']:.2f}; fastest rounds {row['bank_step_ratio_fastest']:.3f}, "
        f"XLA FLOPs {row.get('bank_flops_ratio') or float('nan'):.3f})"))
  report = row.get("lowered_matmul_dtypes")
  if report and row.get("dtype") == "bfloat16":
    convs = set(report["convolution"])
    ok = convs <= {"bf16"} and (report["bf16_fraction"] or 0) >= BF16_FRACTION
    detail = f"conv dtypes {sorted(convs)}, bf16 FLOP share {report['bf16_fraction']}"
    if not ok and convs <= {"bf16"} and row.get("dry_run") == "tiny":
      # Tiny shapes weigh the small f32 matmuls (losses, softmax x V) far more than the
      # real ones: the FLOP share is judged on the full-size traced row.
      ok, detail = None, f"{detail} (judged at full size)"
    out.append(guards.check(f"{name}: bf16 conv/matmul operands", ok, detail))
    if platform != "cpu" and "compiled" in report:  # XLA:CPU runs bf16 convs in f32.
      f32 = sorted(k for k in report["compiled"] if k.startswith(("conv", "convolution"))
                   and "f32" in k)
      out.append(guards.check(f"{name}: compiled convs keep bf16", not f32,
                              ", ".join(f32) or str(report["compiled"])))
  return out


def phases(args: argparse.Namespace, suite: str) -> list[tuple[str | None, Options]]:
  """(dry-run mark, options) of each pass over the workloads: one timed pass, or for
  ``--dry-run`` a tiny compiled pass ("tiny") and a full-size trace ("traced")."""
  base = dict(suite=suite, dtype=args.dtype, torch=not args.no_torch,
              torch_compile=args.torch_compile, torch_threads=args.torch_threads,
              check=args.check, seed=args.seed)
  # Under a deadline, torch.compile runs last: the XLA figures come first.
  deferred = (lambda: []) if args.deadline_s is not None else (lambda: None)
  if not args.dry_run:
    return [(None, Options(**base, deferred=deferred()))]
  return [("tiny", Options(**base, dry_run=True, deferred=deferred())),
          ("traced", Options(**base, abstract=True))]


def run(args: argparse.Namespace, on_update: Callable[[dict[str, Any]], Any] | None = None
        ) -> dict[str, Any]:
  """Runs the workloads; ``on_update(record)`` after each one (the JSON so far)."""
  suite = "quick" if args.quick else args.suite
  names = ([n.strip() for n in args.only.split(",") if n.strip()]
           or list(workloads.suite_names(suite)))
  for n in names:
    workloads.runner(n)  # Unknown names fail before anything runs.
  passes = phases(args, suite)
  start = time.perf_counter()
  with compile_cache(getattr(args, "compile_cache", None), suite) as cache:
    peak = flops.measure_peak(passes[0][1].compute_dtype,
                              n=512 if suite == "quick" or args.dry_run else None)
    for _, opts in passes:
      opts.peak = peak
    record: dict[str, Any] = {
        "benchmark": "suite", "suite": suite, "workloads": names, "argv": sys.argv[1:],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": harness.device_info(), "dtype": passes[0][1].compute_dtype, "peak": peak,
        "dry_run": bool(args.dry_run), "deadline_s": args.deadline_s,
        "compile_cache": (getattr(args, "compile_cache", None) or "temporary") if cache else None,
        "rows": []}
    with gpu_code_paths(args.dry_run and suite == "gpu") as paths:
      if paths:
        record["code_paths"] = paths
      run_workloads(args, names, passes, record, start, on_update)
      run_deferred(args, passes, record, start, on_update)
    if cache:
      record["compile_cache_counts"] = harness.compile_cache_counts()
  record["elapsed_s"] = time.perf_counter() - start
  record["device"]["load_avg_end"] = harness.device_info().get("load_avg_1_5_15")
  if args.check:
    platform = record["device"]["platform"]
    record["checks"] = [c for r in record["rows"] for c in row_checks(r, platform)]
  return record


def run_workloads(args: argparse.Namespace, names: Sequence[str],
                  passes: Sequence[tuple[str | None, Options]], record: dict[str, Any],
                  start: float, on_update: Callable[[dict[str, Any]], Any] | None) -> None:
  """Runs each workload in each pass, appending to ``record["rows"]``."""
  longest = 0.0  # The longest workload so far: what the next one may take.
  for n in names:
    elapsed = time.perf_counter() - start
    if args.deadline_s is not None and elapsed + longest > args.deadline_s:
      record["rows"].append({"workload": n, "point": "-", "skipped": (
          f"not started: {elapsed:.0f} s + {longest:.0f} s (the longest workload so far) "
          f"> --deadline-s {args.deadline_s:g}")})
      continue
    for mark, opts in passes:
      t0 = time.perf_counter()
      print(f"[{n}] {workloads.describe(n)}{f' (dry run: {mark})' if mark else ''} ...",
            file=sys.stderr, flush=True)
      try:
        rows = workloads.runner(n)(opts)
      except Exception as e:  # pylint: disable=broad-except  # Record it, run the others.
        traceback.print_exc()
        rows = [{"workload": n, "point": "-", "error": f"{type(e).__name__}: {e}"[:300]}]
      for r in rows:
        r["wall_s"] = time.perf_counter() - t0
        if mark:
          r["dry_run"] = mark
      record["rows"] += rows
    longest = max(longest, time.perf_counter() - start - elapsed)
    record["elapsed_s"] = time.perf_counter() - start
    if on_update is not None:
      on_update(record)


def run_deferred(args: argparse.Namespace, passes: Sequence[tuple[str | None, Options]],
                 record: dict[str, Any], start: float,
                 on_update: Callable[[dict[str, Any]], Any] | None) -> None:
  """Runs the torch.compile A/B rounds put off to the end (``Options.deferred``), each only
  if the time left before ``--deadline-s`` covers the longest one so far (at first
  ``TORCH_COMPILE_EST_S``); the others leave a note in their row."""
  rows = {r["torch_deferred"]: r for r in record["rows"] if "torch_deferred" in r}
  longest, measured = TORCH_COMPILE_EST_S, []
  for _, opts in passes:
    jobs, opts.deferred = list(opts.deferred or []), [] if opts.deferred is not None else None
    for job in jobs:
      r = rows.get(job.index)
      if r is None:  # Its workload failed after the eager rounds.
        continue
      del r["torch_deferred"]
      left = (args.deadline_s or math.inf) - (time.perf_counter() - start)
      if longest > left:
        r.setdefault("torch_notes", []).append(
            f"torch.compile skipped: {max(left, 0):.0f} s left of --deadline-s "
            f"{args.deadline_s:g}, one takes ~{longest:.0f} s (run --only {r['workload']})")
        continue
      t0 = time.perf_counter()
      print(f"[{r['workload']}] torch.compile A/B rounds ...", file=sys.stderr, flush=True)
      try:
        torch_ab.merge(r, job.run())
      except Exception as e:  # pylint: disable=broad-except  # Reported, never fails the row.
        traceback.print_exc()
        r.setdefault("torch_notes", []).append(
            f"torch.compile failed: {torch_ab.error_text(e, 200)}")
      r["torch_compile_wall_s"] = time.perf_counter() - t0
      measured.append(r["torch_compile_wall_s"])
      longest = max(measured)
      record["elapsed_s"] = time.perf_counter() - start
      if on_update is not None:
        on_update(record)


# The GPU call estimate of a dry run (``gpu_call_estimate``): assumptions, not measurements.
EST_COMPILE_S = (30.0, 60.0)  # One XLA train step / sampler program on an H100.
EST_CACHED_S = 5.0  # A program loaded from the shared compile cache.
EST_TORCH_COMPILE_S = (40.0, 90.0)  # One torch.compile reference: its first two calls.
EST_TORCH_OVER_JAX = (1.0, 2.0)  # PyTorch's step time over JAX's, in the A/B rounds.
AB_WORKLOADS = ("dcl_cstp", "ldm_unet", "drfl", "ltdiff_ddpm", "dsdm_step", "dsdm_ddim")


def timed_calls(r: dict[str, Any], timing: dict[str, Any]) -> tuple[float, float]:
  """(JAX calls outside A/B rounds, calls of each side in one torch reference's A/B
  rounds) that a real run makes for the traced row ``r`` at its estimated step time:
  warm-up, probe and timed calls, as the workloads size them."""
  step = r["est_h100_step_s"]
  rounds, budget = timing["rounds"], timing["budget_s"]
  if r["workload"] == "dcl_cstp_bank":
    return timing["warmup"] + BANK_ROUNDS * torch_ab.iters_per_round(
        step, budget, BANK_ROUNDS), 0.0
  if r["workload"] in AB_WORKLOADS:
    return timing["warmup"], rounds * torch_ab.iters_per_round(step, budget, rounds)
  return timing["warmup"] + min(timing["max_iters"], max(timing["min_iters"], budget / step)), 0.0


def gpu_call_estimate(record: dict[str, Any], deadline_s: float = GPU_DEADLINE_S
                      ) -> dict[str, Any] | None:
  """What ``--suite gpu --check`` would take on an H100, from a dry run's traced rows.

  XLA and eager torch, first: one compile per distinct program (``EST_COMPILE_S``; a row
  ``same_program_as`` another traced row is loaded from the shared compile cache,
  ``EST_CACHED_S``), the host's tracing and lowering (twice what the dry run measured per
  row: the step, then its init and FLOP count; on the dry run's host, slower than a GPU
  host's) and the calls ``timed_calls`` counts at the estimated step time (torch's at
  ``EST_TORCH_OVER_JAX`` times JAX's). Then each A/B row's torch.compile reference
  (``EST_TORCH_COMPILE_S``) and its rounds, run last under the deadline. Returns None
  without traced rows."""
  rows = [r for r in record["rows"] if r.get("dry_run") == "traced" and "error" not in r]
  if not rows:
    return None
  names = {r["workload"] for r in rows}
  cached = sum(r.get("same_program_as") in names for r in rows)
  programs = len(rows) - cached
  host = 2 * sum(r.get("trace_s", 0) + (r.get("lower_s") or 0) for r in rows)
  jax_s = ab_s = 0.0  # Seconds of JAX calls outside A/B rounds; of one side of the rounds.
  n_ab = 0
  for r in rows:
    if r.get("est_h100_step_s"):
      calls, ab_calls = timed_calls(r, TIMING["gpu"])
      jax_s += calls * r["est_h100_step_s"]
      ab_s += ab_calls * r["est_h100_step_s"]
      n_ab += ab_calls > 0
  compile_s = [programs * c + cached * EST_CACHED_S for c in EST_COMPILE_S]
  rounds = [ab_s * (1 + f) for f in EST_TORCH_OVER_JAX]  # One reference's A/B rounds.
  xla = [c + host + jax_s + r for c, r in zip(compile_s, rounds)]
  torch_compile = [n_ab * c + r for c, r in zip(EST_TORCH_COMPILE_S, rounds)]
  return {"xla_programs": programs, "cached_programs": cached, "compile_s": compile_s,
          "host_trace_s": host, "timed_s": [jax_s + r for r in rounds],
          "xla_and_eager_s": xla, "torch_compile_references": n_ab,
          "torch_compile_s": torch_compile,
          "total_s": [a + b for a, b in zip(xla, torch_compile)], "deadline_s": deadline_s}


def print_estimate(est: dict[str, Any]) -> None:
  """The dry run's GPU call estimate, one paragraph."""
  lo_hi = lambda xs: f"{xs[0]:.0f}-{xs[1]:.0f} s"
  print(f"\nestimate of --suite gpu --check on an H100 (assumed {EST_COMPILE_S[0]:.0f}-"
        f"{EST_COMPILE_S[1]:.0f} s per XLA compile, {EST_TORCH_COMPILE_S[0]:.0f}-"
        f"{EST_TORCH_COMPILE_S[1]:.0f} s per torch.compile, {ASSUMED_MFU:.0%} MFU): "
        f"{est['xla_programs']} XLA programs compiled ({lo_hi(est['compile_s'])}, "
        f"{est['cached_programs']} loaded from the shared compile cache) + host tracing "
        f"{est['host_trace_s']:.0f} s (as measured here) + timed JAX and eager torch "
        f"{lo_hi(est['timed_s'])} = "
        f"{lo_hi(est['xla_and_eager_s'])}; then {est['torch_compile_references']} "
        f"torch.compile references {lo_hi(est['torch_compile_s'])}, run last, each only "
        f"while --deadline-s {est['deadline_s']:g} allows; all: {lo_hi(est['total_s'])}")


def fast_compile_for_quick() -> None:
  """--quick is a smoke test: compile with LLVM -O0 (2-3x faster on CPU) unless
  XLA_FLAGS already sets an optimization level. Must run before JAX's backend starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.quick or args.suite == "quick" or args.dry_run:
    fast_compile_for_quick()
  if args.single_thread:
    from benchmarks.diffusion import use_single_thread  # pylint: disable=import-outside-toplevel
    args.pinned_cpu, args.torch_threads = use_single_thread(), "1"
  if args.list:
    for n in workloads.NAMES:
      suites = " ".join(s for s in SUITES if n in workloads.suite_names(s))
      print(f"{n:16s} {suites:14s} {workloads.describe(n)}")
    return {}
  suite = "quick" if args.quick else args.suite
  path = pathlib.Path(args.json) if args.json else harness.results_path(f"suite-{suite}")
  record = run(args, on_update=lambda rec: harness.write_json(rec, path))
  d = record["device"]
  print(f"\nsuite={record['suite']}{' (dry run)' if record['dry_run'] else ''} "
        f"dtype={record['dtype']} on {d['platform']} "
        f"({d['device_kind']}, {d['cpu_model']}, {d['cpu_count']} cpus, load "
        f"{d.get('load_avg_1_5_15')} -> {d.get('load_avg_end')}); matmul peak "
        f"{record['peak']['flops_per_sec'] / 1e9:.1f} GFLOP/s; {record['elapsed_s']:.0f} s")
  harness.print_table([display(r) for r in record["rows"]], COLUMNS)
  failed = []
  if "checks" in record:
    print()
    harness.print_table([{**c, "ok": {True: "ok", False: "FAIL", None: "-"}[c["ok"]]}
                         for c in record["checks"]], ["ok", "check", "detail"])
    failed = guards.failed(record["checks"])
  if record["dry_run"] and suite == "gpu":
    est = gpu_call_estimate(record)
    if est:
      record["gpu_call_estimate"] = est
      print_estimate(est)
  harness.write_json(record, path)
  print(f"wrote {path}")
  skipped = [r["workload"] for r in record["rows"] if "skipped" in r]
  if skipped:
    print(f"skipped past --deadline-s: {', '.join(skipped)}")
  errors = [r for r in record["rows"] if "error" in r]
  if failed or errors:
    sys.exit(1)
  return record


if __name__ == "__main__":
  main()
