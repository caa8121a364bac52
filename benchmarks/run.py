"""The benchmark suite: one table and one JSON record for every workload.

    python -m benchmarks.run --suite cpu|gpu [--only NAME[,NAME...]] [--check]
        [--json PATH] [--quick] [--dtype float32|bfloat16] [--no-torch]
        [--torch-compile | --no-torch-compile] [--torch-threads N|auto] [--single-thread]
        [--list]

``--quick`` (= ``--suite quick``) runs every workload at tiny size, a smoke
test (compiled at LLVM -O0 unless XLA_FLAGS sets a level: its times are not
benchmarks). ``--check`` also evaluates the regression guards on what was measured
(each step traced once, state donated without "donated buffers were not
usable" warnings, no implicit transfers while timing, flat step time as the
bank grows 16x, bf16 operands of every conv and ~all matmuls in bf16 mode)
and exits 1 when one fails. Workloads: ``--list``; sizes and fields:
benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from typing import Any, Sequence

from benchmarks import flops, guards, harness, torch_ab
from benchmarks import workloads
from benchmarks.workloads.common import Options, SUITES

COLUMNS = [("workload", "workload"), ("point", "point"), ("step_s", "step s"),
           ("examples_per_sec", "ex/s"), ("compile_total_s", "compile s"),
           ("gflop_xla", "GFLOP/ex XLA"), ("gflop_analytic", "GFLOP/ex model"),
           ("memory_mib", "mem MiB"), ("mfu", "MFU"), ("torch", "speedup_vs_torch"),
           ("compiles", "traces")]
BF16_FRACTION = 0.99


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
  p.add_argument("--torch-compile", default=None, action=argparse.BooleanOptionalAction,
                 help="also time torch.compile (default: on CUDA only)")
  p.add_argument("--torch-threads", default="auto", help="torch CPU threads: N or auto")
  p.add_argument("--single-thread", action="store_true",
                 help="pin to one core, single-threaded XLA and torch: a per-core comparison "
                      "that a loaded machine disturbs less")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--list", action="store_true", help="list the workloads and exit")
  return p.parse_args(argv)


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
  out["torch"] = torch_ab.summary(row) if row.get("speedup_vs_torch") else None
  if "bank_step_ratio" in row:
    out["torch"] = (f"K ratio {row['bank_step_ratio']:.3f} "
                    f"(fastest {row['bank_step_ratio_fastest']:.3f})")
  if "error" in row:
    out["point"] = f"ERROR: {row['error']}"
  return out


def row_checks(row: dict[str, Any], platform: str = "cpu") -> list[dict[str, Any]]:
  """Guard results of one measured row (``platform``: where it ran)."""
  name = f"{row['workload']} [{row['point']}]"
  if "error" in row:
    return [guards.check(f"{name}: ran", False, row["error"])]
  out = [guards.check(f"{name}: no implicit transfers while timing", True,
                      "timed under jax.transfer_guard('disallow')")]
  if "compiles" in row:
    expected = 2 if "bank_size" in row else 1  # The bank sweep compiles two shapes.
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
    out.append(guards.check(f"{name}: bf16 conv/matmul operands", ok,
                            f"conv dtypes {sorted(convs)}, bf16 FLOP share "
                            f"{report['bf16_fraction']}"))
    if platform != "cpu":  # XLA:CPU runs bf16 convs in f32; accelerators must not.
      f32 = sorted(k for k in report["compiled"] if k.startswith(("conv", "convolution"))
                   and "f32" in k)
      out.append(guards.check(f"{name}: compiled convs keep bf16", not f32,
                              ", ".join(f32) or str(report["compiled"])))
  return out


def run(args: argparse.Namespace) -> dict[str, Any]:
  suite = "quick" if args.quick else args.suite
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(workloads.NAMES)
  for n in names:
    workloads.runner(n)  # Unknown names fail before anything runs.
  opts = Options(suite=suite, dtype=args.dtype, torch=not args.no_torch,
                 torch_compile=args.torch_compile, torch_threads=args.torch_threads,
                 check=args.check, seed=args.seed)
  start = time.perf_counter()
  opts.peak = flops.measure_peak(opts.compute_dtype, n=512 if suite == "quick" else None)
  record: dict[str, Any] = {
      "benchmark": "suite", "suite": suite, "workloads": names, "argv": sys.argv[1:],
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "device": harness.device_info(), "dtype": opts.compute_dtype, "peak": opts.peak,
      "rows": []}
  for n in names:
    t0 = time.perf_counter()
    print(f"[{n}] {workloads.describe(n)} ...", file=sys.stderr, flush=True)
    try:
      rows = workloads.runner(n)(opts)
    except Exception as e:  # pylint: disable=broad-except  # Record it, run the others.
      traceback.print_exc()
      rows = [{"workload": n, "point": "-", "error": f"{type(e).__name__}: {e}"[:300]}]
    for r in rows:
      r["wall_s"] = time.perf_counter() - t0
    record["rows"] += rows
  record["elapsed_s"] = time.perf_counter() - start
  record["device"]["load_avg_end"] = harness.device_info().get("load_avg_1_5_15")
  if args.check:
    platform = record["device"]["platform"]
    record["checks"] = [c for r in record["rows"] for c in row_checks(r, platform)]
  return record


def fast_compile_for_quick() -> None:
  """--quick is a smoke test: compile with LLVM -O0 (2-3x faster on CPU) unless
  XLA_FLAGS already sets an optimization level. Must run before JAX's backend starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.quick or args.suite == "quick":
    fast_compile_for_quick()
  if args.single_thread:
    from benchmarks.diffusion import use_single_thread  # pylint: disable=import-outside-toplevel
    args.pinned_cpu, args.torch_threads = use_single_thread(), "1"
  if args.list:
    for n in workloads.NAMES:
      print(f"{n:16s} {workloads.describe(n)}")
    return {}
  record = run(args)
  d = record["device"]
  print(f"\nsuite={record['suite']} dtype={record['dtype']} on {d['platform']} "
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
  path = harness.write_json(record, args.json, name=f"suite-{record['suite']}")
  print(f"wrote {path}")
  errors = [r for r in record["rows"] if "error" in r]
  if failed or errors:
    sys.exit(1)
  return record


if __name__ == "__main__":
  main()
