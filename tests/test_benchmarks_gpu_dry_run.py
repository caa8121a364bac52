"""The GPU suite before a GPU is lent: ``python -m benchmarks.run --suite gpu --dry-run``, and
the two PyTorch references (eager and ``torch.compile``) of every A/B row.

The dry run compiles and runs each workload once at the quick suite's tiny shapes (bf16, the
GPU's code paths, the guards) and traces + lowers it at the real GPU shapes. The command runs
here for ``ddim50`` (a subprocess, torch hidden as in CI); the other GPU workloads are traced
at tiny size in-process (``Options(dry_run=True, abstract=True)``), and the cheapest train
step, ``ltdiff_ddpm``, at its full GPU size. The torch A/B bookkeeping is checked with fake
steps, so nothing here needs torch. No timing asserts (DESIGN.md).
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run as suite_run  # noqa: E402
from benchmarks import torch_ab, workloads  # noqa: E402
from benchmarks.workloads.common import Options  # noqa: E402

# What issue 18 asks of a lent GPU: DCL-CsTP at 224 px (+ the bank guard), the LDM UNet at
# 64^2 latents, DDIM-50, the DRFL / LTDiff++ / DSDM steps at paper size.
ISSUE_WORKLOADS = {"dcl_cstp", "dcl_cstp_bank", "ldm_unet", "ddim50", "drfl", "ltdiff_ddpm",
                   "dsdm_step"}


def test_gpu_suite_covers_the_issue(capsys):
  assert set(workloads.suite_names("gpu")) == ISSUE_WORKLOADS
  assert workloads.suite_names("cpu") == workloads.NAMES
  suite_run.main(["--list"])
  listed = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()}
  assert set(listed) == set(workloads.NAMES)
  assert all(("gpu" in listed[n]) == (n in ISSUE_WORKLOADS) for n in listed)


def test_dry_run_of_the_gpu_suite_writes_its_table_and_json(tmp_path):
  out = tmp_path / "dry.json"
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XLA_FLAGS": ""}  # One device.
  argv = ["benchmarks.run", "--suite", "gpu", "--dry-run", "--check", "--only", "ddim50",
          "--json", str(out)]
  code = ("import runpy, sys; sys.modules['torch'] = None; "  # As CI: no [bench] extra.
          f"sys.argv = {argv!r}; runpy.run_module('benchmarks.run', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "suite=gpu (dry run) dtype=bfloat16" in proc.stdout
  assert "dry run: compiled and run at tiny size" in proc.stdout
  assert "speedup_vs_torch_compile" in proc.stdout  # The table's columns.
  record = json.loads(out.read_text())
  assert record["dry_run"] and record["suite"] == "gpu" and record["dtype"] == "bfloat16"
  assert record["code_paths"] == suite_run.GPU_PATHS
  tiny, traced = record["rows"]
  assert (tiny["workload"], tiny["dry_run"], traced["dry_run"]) == ("ddim50", "tiny", "traced")
  assert "error" not in tiny and "error" not in traced
  assert tiny["step_s"] > 0 and tiny["dtype"] == "bfloat16" and tiny["jit_cache_size"] == 1
  assert len(tiny["times"]) == 1  # One timed call: a dry run, not a measurement.
  assert traced["point"] == "ldm 64x64x3 B64 bfloat16" and traced["abstract"]
  assert traced["flops_per_step_analytic"] > 1e14 and traced["est_h100_step_s"] > 0
  assert "step_s" not in traced and "times" not in traced
  assert record["checks"] and all(c["ok"] is not False for c in record["checks"])
  # The estimate of the GPU call, and the compile cache shared by the run's workloads.
  assert "estimate of --suite gpu --check on an H100" in proc.stdout
  est = record["gpu_call_estimate"]
  assert (est["xla_programs"], est["cached_programs"]) == (1, 0)
  assert record["compile_cache"] == "temporary" and record["deadline_s"] is None


# ddim50 runs in the command above, ltdiff_ddpm at full size below.
@pytest.mark.parametrize("name", sorted(ISSUE_WORKLOADS - {"ddim50", "ltdiff_ddpm"}))
def test_every_gpu_workload_traces_at_tiny_size(name):
  """The GPU suite's code path of each workload (bf16, the GPU's conv paths) traced at the
  dry run's tiny shapes: what the dry run compiles, without lowering or compiling."""
  opts = Options(suite="gpu", dry_run=True, abstract=True, torch=False)
  with suite_run.gpu_code_paths(True):
    rows = workloads.runner(name)(opts)
  assert rows and all(r["workload"] == name and r["abstract"] for r in rows)
  if name == "dcl_cstp_bank":  # Its K program is dcl_cstp's (compiled once in a run).
    assert [r.get("same_program_as") for r in rows] == ["dcl_cstp", None]
  for r in rows:
    assert r["dtype"] == "bfloat16" and r["flops_per_step_analytic"] > 0
    assert r["compiles"] == 1 and r["trace_s"] > 0 and r["lower_s"] is None


def test_a_gpu_train_step_traces_at_its_full_size():
  """ltdiff_ddpm at the GPU suite's shapes (paper preset, B64), traced and lowered only."""
  opts = Options(suite="gpu", abstract=True, torch=False, check=True)
  (r,) = workloads.runner("ltdiff_ddpm")(opts)
  assert r["point"] == "paper 16x16x4 (+4 concat) B64 bfloat16" and r["batch"] == 64
  assert r["lowered_matmul_dtypes"]["bf16_fraction"] >= suite_run.BF16_FRACTION
  checks = suite_run.row_checks({**r, "dry_run": "traced"})
  assert [c["check"].split(": ")[-1] for c in checks] == ["step traced once per shape",
                                                          "bf16 conv/matmul operands"]
  assert all(c["ok"] for c in checks)


# ------------------------------------------------------------------ options and rows


def test_options_of_the_dry_run_and_the_torch_references():
  dry = Options(suite="gpu", dry_run=True)
  assert dry.compute_dtype == "bfloat16" and dry.size({"quick": 1, "gpu": 2}) == 1
  assert dry.timing["rounds"] == 1 and dry.iters(1e-6) == 1 and len(dry.devices()) == 1
  assert dry.torch_gpu_setups is True and not dry.compile_torch
  assert "dry run" in dry.torch_notes[0]
  assert Options(suite="cpu").compile_torch and Options(suite="cpu").torch_notes == []
  assert Options(suite="gpu").compile_torch and Options(suite="gpu").torch_gpu_setups is None
  assert not Options(suite="quick").compile_torch
  assert "--quick" in Options(suite="quick").torch_notes[0]
  assert Options(suite="cpu", torch_compile=False).torch_notes == [
      "torch.compile skipped (--no-torch-compile)"]
  assert Options(suite="quick", torch_compile=True).compile_torch
  assert [s["name"] for s in torch_ab.setups(True, gpu=True)] == [
      "eager_bf16_channels_last", "compiled_bf16_channels_last"]
  assert [(s["name"], s["kind"], s["amp"]) for s in torch_ab.setups(False, gpu=False)] == [
      ("eager", "eager", False)]


def _ratio(median):
  return {"median": median, "min": median - 0.1, "max": median + 0.1, "ratios": [median]}


def test_rows_show_both_ratios_and_the_dry_run_notes():
  row = {"workload": "w", "point": "p", "speedup_vs_torch_eager": _ratio(1.5),
         "speedup_vs_torch_compile": None, "dry_run": "tiny",
         "torch_notes": ["torch.compile failed: RuntimeError: no compiler"]}
  shown = suite_run.display(row)
  assert shown["torch_eager"] == "1.5 (1.4-1.6)" and shown["torch_compile"] is None
  assert shown["note"] == ("dry run: compiled and run at tiny size; torch.compile failed: "
                           "RuntimeError: no compiler")
  traced = suite_run.display({"workload": "w", "point": "p", "dry_run": "traced",
                              "est_h100_step_s": 0.0348, "est_assumed_mfu": 0.35})
  assert traced["note"] == ("dry run: traced at full size, not compiled; "
                            "est. H100 34.8 ms/step at 35% MFU")
  assert suite_run.row_checks({"workload": "w", "point": "-", "skipped": "deadline"}) == []


def test_bf16_share_is_judged_at_full_size_in_a_dry_run():
  report = {"convolution": {"bf16": 1.0}, "bf16_fraction": 0.97}
  row = {"workload": "w", "point": "p", "dtype": "bfloat16", "lowered_matmul_dtypes": report}
  (tiny,) = suite_run.row_checks({**row, "dry_run": "tiny"})
  (full,) = suite_run.row_checks({**row, "dry_run": "traced"})
  assert tiny["ok"] is None and "judged at full size" in tiny["detail"] and full["ok"] is False
  bad = {**report, "convolution": {"bf16": 1.0, "f32": 1.0}}
  (f32_conv,) = suite_run.row_checks({**row, "dry_run": "tiny", "lowered_matmul_dtypes": bad})
  assert f32_conv["ok"] is False


# ------------------------------------------------------------------ torch_ab with fake steps


@pytest.fixture
def fake_torch(monkeypatch):
  """torch_ab without torch: CPU setups, no thread probe."""
  monkeypatch.setattr(torch_ab, "device", lambda: "cpu")
  monkeypatch.setattr(torch_ab, "set_threads", lambda step, spec: (1, {}))


def _factory(eager_s: float, compiled):
  """A torch factory whose eager step sleeps ``eager_s``; ``compiled`` is the compiled
  step's sleep, or an exception its first call raises."""

  def make(amp, channels_last, compile_):
    del amp, channels_last
    if not compile_:
      return lambda: time.sleep(eager_s)
    if isinstance(compiled, Exception):
      def fail():
        raise compiled
      return fail
    return lambda: time.sleep(compiled)

  return make


def test_compare_reports_eager_and_compile(fake_torch):
  del fake_torch
  _, fields = torch_ab.compare(lambda: time.sleep(0.002), _factory(0.02, 0.004), batch=4,
                               rounds=2, iters=1, torch_compile=True)
  assert set(fields["torch"]) == {"eager", "compiled"}
  for kind in ("eager", "compile"):
    sp = fields[f"speedup_vs_torch_{kind}"]
    assert sp["min"] <= sp["median"] <= sp["max"] and len(sp["ratios"]) == 2
  # speedup_vs_torch is against the faster reference: here the compiled one.
  assert fields["torch_setup"] == "compiled"
  assert fields["speedup_vs_torch"] is fields["speedup_vs_torch_compile"]
  assert fields["torch"]["compiled"]["kind"] == "compile"
  assert fields["torch"]["compiled"]["first_calls_s"] > 0 and fields["torch_notes"] == []


def test_compare_reports_a_failed_compile_in_the_row(fake_torch):
  del fake_torch
  _, fields = torch_ab.compare(lambda: None, _factory(0.001, RuntimeError("no C++ compiler")),
                               batch=4, rounds=1, iters=1, torch_compile=True)
  assert fields["speedup_vs_torch_compile"] is None
  assert fields["speedup_vs_torch"] is fields["speedup_vs_torch_eager"]
  assert fields["torch_setup"] == "eager"
  assert fields["torch"]["compiled"]["error"] == "RuntimeError: no C++ compiler"
  assert fields["torch_notes"] == ["torch.compile failed: RuntimeError: no C++ compiler"]


def test_compare_fails_when_the_eager_reference_fails(fake_torch):
  del fake_torch

  def broken(amp, channels_last, compile_):
    raise ValueError("broken reference")

  with pytest.raises(ValueError, match="broken reference"):
    torch_ab.compare(lambda: None, broken, batch=1, rounds=1, iters=1)


# ------------------------------------------------------------------ one call of the GPU


def test_gpu_suite_deadline_default_and_override():
  assert suite_run.parse_args(["--suite", "gpu"]).deadline_s == suite_run.GPU_DEADLINE_S < 480
  assert suite_run.parse_args(["--suite", "gpu", "--deadline-s", "600"]).deadline_s == 600
  assert suite_run.parse_args(["--suite", "gpu", "--deadline-s", "inf"]).deadline_s is None
  assert suite_run.parse_args(["--suite", "gpu", "--dry-run"]).deadline_s is None
  assert suite_run.parse_args(["--suite", "cpu"]).deadline_s is None
  # Under a deadline the torch.compile rounds are put off to the end; otherwise not.
  (_, gpu), = suite_run.phases(suite_run.parse_args(["--suite", "gpu"]), "gpu")
  (_, cpu), = suite_run.phases(suite_run.parse_args(["--suite", "cpu"]), "cpu")
  assert gpu.deferred == [] and cpu.deferred is None


class _FakeBench:
  """A JAX step stand-in for ``torch_compare``: a callable with a batch size."""
  batch_size = 4

  def __call__(self):
    time.sleep(0.002)


def test_torch_compare_defers_the_compiled_reference(fake_torch, monkeypatch):
  from benchmarks.workloads import common  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(torch_ab, "torch_or_none", lambda: object())  # "Installed".
  opts = Options(suite="gpu", deferred=[])
  opts.timing.update(rounds=1, budget_s=0.0)
  compare = common.torch_compare(opts, lambda bench, record: _factory(0.004, 0.001))
  record = {"probe_s": 0.002}
  compare(_FakeBench(), record)
  assert set(record["torch"]) == {"eager"} and record["speedup_vs_torch_compile"] is None
  (job,) = opts.deferred
  assert record["torch_deferred"] == job.index == 0
  row = dict(record)
  torch_ab.merge(row, job.run())
  assert set(row["torch"]) == {"eager", "compiled"}
  assert row["speedup_vs_torch_compile"] and row["speedup_vs_torch_eager"]
  assert row["torch_setup"] == "compiled"  # The faster of the two references.


def _deferred_row(index):
  return {"workload": f"w{index}", "point": "p", "torch_deferred": index,
          "torch": {"eager": {"kind": "eager", "step_s": 0.01}},
          "speedup_vs_torch_eager": _ratio(2.0), "speedup_vs_torch_compile": None,
          "torch_notes": []}


def test_deferred_torch_compile_runs_while_the_deadline_allows(monkeypatch):
  """XLA figures first: the compiled references run last, each only if the time left
  covers the longest so far; the rest are skipped with a note."""
  from benchmarks.workloads.common import DeferredCompile  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(suite_run, "TORCH_COMPILE_EST_S", 0.5)
  fields = {"torch": {"compiled": {"kind": "compile", "step_s": 0.005}},
            "speedup_vs_torch_compile": _ratio(1.0), "torch_notes": []}

  def slow():
    time.sleep(0.6)
    return fields

  calls = []
  jobs = [DeferredCompile(0, lambda: calls.append(0) or fields),
          DeferredCompile(1, lambda: calls.append(1) or slow()),
          DeferredCompile(2, lambda: calls.append(2) or fields)]
  opts = Options(suite="gpu", deferred=jobs)
  record = {"rows": [_deferred_row(i) for i in range(3)]}
  args = suite_run.parse_args(["--suite", "gpu", "--deadline-s", "1.0"])
  updates = []
  suite_run.run_deferred(args, [(None, opts)], record, time.perf_counter(), updates.append)
  first, second, third = record["rows"]
  assert calls == [0, 1] and opts.deferred == [] and len(updates) == 2
  assert first["speedup_vs_torch_compile"] == _ratio(1.0)
  assert first["torch_setup"] == "compiled" and "torch_deferred" not in first
  assert first["torch_compile_wall_s"] >= 0 and second["torch_compile_wall_s"] >= 0.6
  # ~0.4 s left: less than the longest compile so far (0.6 s), so the third is skipped.
  assert third["speedup_vs_torch_compile"] is None and "torch_deferred" not in third
  assert third["torch_notes"][0].startswith("torch.compile skipped:")
  assert "of --deadline-s 1," in third["torch_notes"][0]
  assert "torch.compile skipped" in suite_run.display(third)["note"]


def test_a_failed_deferred_compile_is_noted():
  from benchmarks.workloads.common import DeferredCompile  # pylint: disable=import-outside-toplevel

  def fail():
    raise RuntimeError("inductor broke")

  opts = Options(suite="gpu", deferred=[DeferredCompile(0, fail)])
  record = {"rows": [_deferred_row(0)]}
  args = suite_run.parse_args(["--suite", "gpu", "--deadline-s", "inf"])
  suite_run.run_deferred(args, [(None, opts)], record, time.perf_counter(), None)
  (row,) = record["rows"]
  assert row["torch_notes"] == ["torch.compile failed: RuntimeError: inductor broke"]
  assert row["speedup_vs_torch_compile"] is None and "torch_setup" not in row


def test_workloads_share_one_compile_cache(tmp_path):
  """A program compiled again in the run (same HLO: dcl_cstp_bank's K step after
  dcl_cstp's) is loaded from the run's compile cache; the settings are restored after."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import harness  # pylint: disable=import-outside-toplevel
  with suite_run.compile_cache("off", "gpu") as off, suite_run.compile_cache(None, "cpu") as cpu:
    assert off is None and cpu is None
  before = jax.config.jax_compilation_cache_dir
  def fn(x):  # A new function object per call: no in-memory cache of JAX serves it.
    return (lambda y: jnp.tanh(y @ y.T) * 3.0 + 1.0)(x)
  x = jnp.ones((16, 16))
  with suite_run.compile_cache(None, "gpu") as path:
    assert pathlib.Path(path).is_dir() and jax.config.jax_compilation_cache_dir == path
    hits = harness.compile_cache_counts()["hits"]
    jax.jit(lambda x: fn(x)).lower(x).compile()
    assert harness.compile_cache_counts()["hits"] == hits  # Compiled, then stored.
    jax.jit(lambda x: fn(x)).lower(x).compile()  # A new jit object: loaded from the cache.
    assert harness.compile_cache_counts()["hits"] == hits + 1
  assert not pathlib.Path(path).exists() and jax.config.jax_compilation_cache_dir == before
  keep = tmp_path / "cache"
  with suite_run.compile_cache(str(keep), "cpu") as path:  # A given directory: any suite.
    assert path == str(keep)
    jax.jit(lambda x: fn(x)).lower(x).compile()
  assert any(keep.iterdir())


def test_gpu_call_estimate_from_traced_rows(capsys):
  traced = lambda name, step, **kw: {"workload": name, "point": "p", "dry_run": "traced",
                                     "trace_s": 1.0, "lower_s": 0.5,
                                     "est_h100_step_s": step, **kw}
  record = {"rows": [
      traced("dcl_cstp", 0.035), traced("dcl_cstp_bank", 0.035, same_program_as="dcl_cstp"),
      traced("dcl_cstp_bank", 0.035), traced("ddim50", 0.6),
      {"workload": "x", "point": "p", "dry_run": "tiny"}]}
  est = suite_run.gpu_call_estimate(record)
  assert (est["xla_programs"], est["cached_programs"]) == (3, 1)
  assert est["torch_compile_references"] == 1 and est["host_trace_s"] == 2 * 4 * 1.5
  lo, hi = suite_run.EST_COMPILE_S
  assert est["compile_s"] == [3 * lo + suite_run.EST_CACHED_S, 3 * hi + suite_run.EST_CACHED_S]
  assert est["xla_and_eager_s"][0] > est["compile_s"][0] + est["host_trace_s"]
  assert est["total_s"] == [a + b for a, b in zip(est["xla_and_eager_s"],
                                                  est["torch_compile_s"])]
  suite_run.print_estimate(est)
  assert "3 XLA programs compiled" in capsys.readouterr().out
  assert suite_run.gpu_call_estimate({"rows": []}) is None
