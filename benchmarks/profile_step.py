"""Where the time of the DCL-CsTP step goes, per op and per pass (JAX), and in PyTorch.

    python -m benchmarks.profile_step [--suite cpu|gpu|quick] [--steps 2] [--top 20]
        [--single-thread] [--no-torch] [--json PATH]

1. Runs the real step (``benchmarks.steps.StepBench``) under
   ``jax.profiler.trace`` and sums the device-thread time of every executed
   HLO op (``jax.profiler.ProfileData``). Each op is classified from the
   compiled HLO text: its kind (conv, dot, copy/transpose, reduce,
   elementwise) and its pass from the JAX op name (``transpose(jvp(...))`` =
   backward, ``jvp(...)`` = online forward, ``vmap`` = augmentation,
   ``ContrastiveNet.embed`` without jvp = momentum forward); convolutions of
   the backward pass are split into input and filter gradients.
2. With torch installed, profiles the PyTorch reference step
   (``torch.profiler``, self CPU time) and groups its ops the same way.
Times are thread time summed over the step (ops on different threads overlap),
divided by the number of profiled steps.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
from typing import Any, Sequence

import jax

from benchmarks import guards, harness, steps, torch_ab
from benchmarks.workloads import ssl
from benchmarks.workloads.common import SUITES, Options

_CONTROL = ("while", "call", "conditional")


def _op_name(line: str) -> str:
  m = re.search(r'op_name="([^"]*)"', line)
  return m.group(1) if m else ""


def classify(name: str, instrs: dict, comps: dict) -> tuple[str, str]:
  """(kind, pass) of one executed HLO op."""
  _, opcode, line = instrs.get(name, ("", "?", ""))
  body = [line]
  m = re.search(r"calls=%([\w.-]+)", line)
  if m:
    body += [instrs[n][2] for n in comps.get(m.group(1), [])]
  text = "\n".join(body)
  op_name = _op_name(line) or next((_op_name(b) for b in body if _op_name(b)), "")
  if " convolution(" in text:
    kind = "conv"
  elif " dot(" in text:
    kind = "dot"
  elif opcode in ("copy", "transpose") or "transpose" in name or "copy" in name:
    kind = "copy/transpose"
  elif "reduce" in opcode or "reduce" in name:
    kind = "reduce"
  else:
    kind = "elementwise/other"
  if "transpose(jvp(" in op_name or (kind == "conv" and not op_name):
    phase = "backward"
    if kind == "conv":
      window = re.search(r"window=\{size=(\d+)x(\d+)", text)
      big = window and int(window.group(1)) > 7
      phase = ("backward: filter grad" if big or "f01b" in text.split("dim_labels=")[-1][:4]
               else "backward: input grad" if "lhs_dilate" in text or "transpose(jvp(" in op_name
               else "backward")
  elif "jvp(" in op_name:
    phase = "forward (online, 3 views)"
  elif "vmap(" in op_name:
    phase = "augmentation"
  elif "ContrastiveNet.embed" in op_name:
    phase = "forward (momentum, 2 views)"
  else:
    phase = "losses/optimizer/other"
  return kind, phase


def jax_profile(bench: steps.StepBench, num_steps: int) -> dict[str, Any]:
  """Per-op thread time (ms per step) of the compiled step, classified."""
  harness.sync(bench())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(num_steps):
        bench()
      harness.sync(bench.metrics)
    path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    per_op = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for ev in line.events:
          op = dict(ev.stats).get("hlo_op")
          if op:
            per_op[str(op)] += ev.duration_ns / 1e6 / num_steps
  instrs, comps = guards.parse_hlo(bench.compiled.as_text())
  rows, groups = [], collections.Counter()
  for op, ms in per_op.most_common():
    if instrs.get(op, ("", ""))[1] in _CONTROL:
      continue  # Its body's ops are counted themselves.
    kind, phase = classify(op, instrs, comps)
    rows.append({"op": op, "kind": kind, "pass": phase, "ms_per_step": ms})
    groups[(phase, kind)] += ms
  total = sum(groups.values())
  return {"ops": rows, "total_ms": total,
          "groups": [{"pass": p, "kind": k, "ms_per_step": v, "share": v / total}
                     for (p, k), v in groups.most_common()]}


_TORCH_GROUPS = (("convolution_backward", "conv backward"), ("convolution", "conv forward"),
                 ("batch_norm_backward", "batchnorm backward"), ("batch_norm", "batchnorm forward"),
                 ("mm", "matmul"), ("linear", "matmul"), ("sgd", "optimizer"),
                 ("foreach", "optimizer/momentum update"))


def torch_profile(config: Any, state: Any, views: Any, num_steps: int,
                  threads: str = "auto") -> dict[str, Any]:
  """Self CPU time (ms per step) of the torch reference step, by op and by group."""
  import torch  # pylint: disable=import-outside-toplevel
  step = ssl.dual_stream_factory(config, state, views)(False, False, False)
  torch_ab.set_threads(step, threads)
  step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(num_steps):
      step()
  ops, groups = [], collections.Counter()
  for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total):
    ms = e.self_cpu_time_total / 1e3 / num_steps
    if ms <= 0:
      continue
    group = next((g for key, g in _TORCH_GROUPS if key in e.key), "other")
    ops.append({"op": e.key, "group": group, "ms_per_step": ms})
    groups[group] += ms
  total = sum(groups.values())
  return {"ops": ops, "total_ms": total, "threads": torch.get_num_threads(),
          "groups": [{"group": g, "ms_per_step": v, "share": v / total}
                     for g, v in groups.most_common()]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--suite", default="cpu", choices=SUITES)
  p.add_argument("--steps", type=int, default=2, help="profiled steps")
  p.add_argument("--top", type=int, default=20, help="ops to print")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--single-thread", action="store_true",
                 help="one core, single-threaded XLA and torch (per-core profile)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  threads = "auto"
  if args.single_thread:
    from benchmarks.diffusion import use_single_thread  # pylint: disable=import-outside-toplevel
    use_single_thread()
    threads = "1"
  opts = Options(suite=args.suite)
  c = ssl.ssl_config("dcl_cstp", opts, **opts.size(ssl.MAIN))
  record: dict[str, Any] = {"benchmark": "profile_step", "point": ssl.point(c),
                            "device": harness.device_info()}
  with steps.built(c, ssl.ssl_batch(c, 0)) as bench:
    bench.compile()
    views, _ = ssl.make_views(c, bench.method, bench.batch, 0)
    state = jax.device_get(bench.state)
    record["jax"] = jax_profile(bench, args.steps)
  if not args.no_torch and torch_ab.torch_or_none() is not None:
    record["torch"] = torch_profile(c, state, views, args.steps, threads)
  print(f"\nDCL-CsTP step profile: {record['point']}")
  j = record["jax"]
  print(f"\nJAX: {j['total_ms']:.0f} ms of op thread time per step, by pass and kind")
  harness.print_table(j["groups"], ["pass", "kind", "ms_per_step", "share"])
  print(f"\nJAX: top {args.top} ops")
  harness.print_table(j["ops"][:args.top], ["op", "kind", "pass", "ms_per_step"])
  if "torch" in record:
    t = record["torch"]
    print(f"\nPyTorch ({t['threads']} threads): {t['total_ms']:.0f} ms self CPU time per step")
    harness.print_table(t["groups"], ["group", "ms_per_step", "share"])
    harness.print_table(t["ops"][:args.top], ["op", "group", "ms_per_step"])
  path = harness.write_json(record, args.json, name="profile-dcl")
  print(f"wrote {path}")
  return record


if __name__ == "__main__":
  main()
