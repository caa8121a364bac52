"""Diffusion UNet benchmark: train step (JAX vs PyTorch), DDIM sampling, compilations.

    python -m benchmarks.diffusion [--size tiny|small|ldm] [--batch B] [--latent 16]
        [--channels 3] [--steps N] [--ddim 50] [--no-torch] [--torch-compile]
        [--json PATH]

Measures, for ``get_diffusion_unet(size)`` on (B, latent, latent, channels):

1. The jitted JAX train step (L_simple eps-prediction via
   ``diffusion.training_losses``, AdamW, params and optimizer state donated):
   compile time, median step time, examples/s, XLA's FLOPs per example and
   the compiled program's memory.
2. The same step in PyTorch (``benchmarks.torch_ref``; eager, and
   ``torch.compile`` with ``--torch-compile``), timed in alternating A/B
   rounds in this process: ``speedup_vs_torch`` = torch step / JAX step
   (> 1: JAX is faster), median/min/max over rounds.
3. DDIM sampling with ``make_sampler``: images/s, and the sampler overhead
   (DDIM time - n x forward) / (n x forward) against the jitted bare UNet
   forward at the same batch (target <= 5%), in alternating rounds.
4. ``sampler_compilations``: model traces over two calls of one jitted
   sampler with equal shapes (expected 1), and its jit cache size.

Prints a table and writes JSON (default ``benchmarks/results/``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from medrep_jax import diffusion
from medrep_jax.models.diffusion_unet import (DIFFUSION_UNET_SIZES,
                                              diffusion_unet_config,
                                              get_diffusion_unet)

OVERHEAD_TARGET = 0.05
NUM_TIMESTEPS = 1000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.diffusion",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="small", choices=DIFFUSION_UNET_SIZES,
                 help="DiffusionUNet preset")
  p.add_argument("--batch", type=int, default=16, help="examples per step / sampler call")
  p.add_argument("--latent", type=int, default=16, help="latent height = width")
  p.add_argument("--channels", type=int, default=3, help="latent channels")
  p.add_argument("--steps", type=int, default=24,
                 help="timed train steps per framework (split into A/B rounds)")
  p.add_argument("--rounds", type=int, default=8, help="A/B rounds (at most --steps)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
  p.add_argument("--ddim", type=int, default=50, help="DDIM steps")
  p.add_argument("--sample-rounds", type=int, default=3,
                 help="alternating rounds of (1 DDIM call, --forward-iters forward calls)")
  p.add_argument("--forward-iters", type=int, default=0,
                 help="timed forward calls per sampling round (0: --ddim, so both "
                      "halves of a round take about as long)")
  p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--torch-threads", default="auto",
                 help="torch intra-op threads: an int, or 'auto' to probe 1 and all "
                      "cores and keep the faster (OpenMP barriers degrade badly on a "
                      "loaded machine)")
  p.add_argument("--single-thread", action="store_true",
                 help="pin the process to one core, single-threaded XLA Eigen kernels "
                      "and 1 torch thread: a per-core comparison that a loaded machine "
                      "disturbs less")
  p.add_argument("--torch-compile", action="store_true",
                 help="also time torch.compile (slow to compile on CPU)")
  p.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
  return p.parse_args(argv)


# ------------------------------------------------------------------ JAX train step


def make_train_step(model, sched, tx):
  """jit(step(params, opt_state, x0, rng) -> (params, opt_state, loss)), donating state."""

  def step(params, opt_state, x0, rng):
    def loss_fn(p):
      model_fn = lambda x, t, _: model.apply(p, x, t)
      return diffusion.training_losses(sched, model_fn, x0, rng,
                                       parameterization="eps")["loss"].mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


class JaxTrainer:
  """Holds the donated train state; ``__call__`` runs one compiled step."""

  def __init__(self, model, sched, params, x0, lr: float, seed: int):
    self.tx = optax.adamw(lr, weight_decay=1e-4)
    self.params, self.opt_state, self.x0 = params, self.tx.init(params), x0
    self.jitted = make_train_step(model, sched, self.tx)
    self.keys = list(jax.random.split(jax.random.key(seed + 1), 16))
    self.i = 0
    self.compiled = None

  def compile(self) -> harness.CompileResult:
    res = harness.compile_time(self.jitted, self.params, self.opt_state, self.x0,
                               self.keys[0])
    self.compiled = res.compiled
    return res

  def __call__(self):
    self.i += 1
    self.params, self.opt_state, loss = self.compiled(
        self.params, self.opt_state, self.x0, self.keys[self.i % len(self.keys)])
    return loss


# ------------------------------------------------------------------ torch reference


def pick_threads(step, candidates: Sequence[int], probe_steps: int = 3
                 ) -> tuple[int, dict[str, float | None]]:
  """Times ``step`` under each torch thread count; returns (fastest, {n: median s}).

  A candidate whose warm-up step alone takes 5x the best median so far is not
  timed further (its median is recorded as None).
  """
  import torch  # pylint: disable=import-outside-toplevel
  probes: dict[str, float | None] = {}
  best, best_s = candidates[0], float("inf")
  for n in candidates:
    torch.set_num_threads(n)
    start = time.perf_counter()
    step()
    if time.perf_counter() - start > 5 * best_s:
      probes[str(n)] = None
      continue
    med = harness.time_fn(step, warmup=0, iters=probe_steps)["median_s"]
    probes[str(n)] = med
    if med < best_s:
      best, best_s = n, med
  torch.set_num_threads(best)
  return best, probes


def build_torch(args, x0_nhwc: np.ndarray) -> dict[str, Any]:
  """Eager (and optionally compiled) torch train steps; {"eager": fn, ...}."""
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from benchmarks.torch_ref import diffusion_unet as ref
  torch.manual_seed(args.seed)
  model = ref.unet_from_config(diffusion_unet_config(args.size), args.channels,
                               args.channels)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model.to(device)
  x0 = torch.from_numpy(np.array(x0_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)
  eager = ref.DDPMTrainStep(model, lr=args.lr)
  if args.single_thread:
    candidates = [1]
  elif device == "cuda":
    candidates = [torch.get_num_threads()]
  elif args.torch_threads == "auto":
    candidates = sorted({1, torch.get_num_threads()})
  else:
    candidates = [int(args.torch_threads)]
  threads, probes = pick_threads(lambda: eager(x0), candidates)
  out = {"model": model, "device": device, "eager": lambda: eager(x0),
         "fused_adamw": eager.fused,
         "params": ref.count_params(model), "threads": threads,
         "thread_probe_s": probes}
  if not args.torch_compile:
    out["compile_status"] = "skipped (pass --torch-compile; inductor CPU compile is slow)"
    return out
  try:
    cmodel = ref.unet_from_config(diffusion_unet_config(args.size), args.channels,
                                  args.channels).to(device)
    cmodel.load_state_dict(model.state_dict())
    cstep = ref.DDPMTrainStep(torch.compile(cmodel), lr=args.lr)
    start = time.perf_counter()
    for _ in range(2):  # The second call can recompile (dynamic-shape guards).
      cstep(x0)
    out["compile_s"] = time.perf_counter() - start
    out["compiled"] = lambda: cstep(x0)
    out["compile_status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except  # Record why, keep going.
    out["compile_status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return out


def compare_with_torch(record: dict[str, Any], trainer: JaxTrainer, args,
                       x0: np.ndarray, rounds: int, iters: int) -> dict[str, Any]:
  """A/B rounds of the JAX and torch steps; fills ``record``, returns JAX's timing."""
  part = build_torch(args, x0)
  n_params = record["params"]["jax"]
  record["params"].update(torch=part["params"], torch_over_jax=part["params"] / n_params)
  ab = harness.ab_compare(trainer, part["eager"], rounds, iters=iters, warmup=args.warmup)
  timing, eager = ab.pop("jax"), ab.pop("torch")
  eager.update(examples_per_sec=args.batch / eager["median_s"], device=part["device"],
               fused_adamw=part["fused_adamw"], threads=part["threads"],
               thread_probe_s=part["thread_probe_s"])
  record["torch_train"] = {"eager": eager, "compile_status": part["compile_status"]}
  record["speedup_vs_torch"] = ab
  if "compiled" in part:
    abc = harness.ab_compare(trainer, part["compiled"], rounds, iters=iters, warmup=1)
    abc.pop("jax")
    compiled = abc.pop("torch")
    compiled.update(compile_s=part["compile_s"],
                    examples_per_sec=args.batch / compiled["median_s"])
    record["torch_train"]["compiled"] = compiled
    record["speedup_vs_torch_compile"] = abc
  return timing


# ------------------------------------------------------------------ sampling


def bench_sampling(model, sched, params, args) -> dict[str, Any]:
  """DDIM throughput, overhead vs the bare forward, and compilations per call."""
  shape = (args.batch, args.latent, args.latent, args.channels)
  traces = [0]

  def apply_fn(p, x, t, cond):
    del cond
    traces[0] += 1  # Runs only while tracing.
    return model.apply(p, x, t)

  sample = diffusion.make_sampler(apply_fn, sched, shape, sampler="ddim",
                                  num_steps=args.ddim)
  rngs = list(jax.random.split(jax.random.key(args.seed + 2), 4))
  start = time.perf_counter()
  harness.sync(sample(params, rngs[0]))
  first_call_s = time.perf_counter() - start
  harness.sync(sample(params, rngs[1]))
  compilations = traces[0]
  # pylint: disable-next=protected-access
  cache_size = sample._cache_size() if hasattr(sample, "_cache_size") else None

  forward = jax.jit(lambda p, x, t: model.apply(p, x, t))
  x = jax.random.normal(rngs[2], shape)
  t = jnp.full((args.batch,), NUM_TIMESTEPS // 2, jnp.int32)
  fwd_compile = harness.compile_time(forward, params, x, t)
  fwd = fwd_compile.compiled
  for _ in range(2):
    harness.sync(fwd(params, x, t))
  # The sampler already ran twice above, so no warm-up call here.
  med = harness.interleave(
      {"ddim": lambda: sample(params, rngs[3]), "forward": lambda: fwd(params, x, t)},
      args.sample_rounds, iters={"ddim": 1, "forward": args.forward_iters or args.ddim},
      warmup=0)
  n = args.ddim
  overhead = harness.ratio_stats([(d - n * f) / (n * f)
                                  for d, f in zip(med["ddim"], med["forward"])])
  # Load only adds time, so the fastest rounds are the least disturbed estimate.
  overhead["from_min_times"] = (min(med["ddim"]) - n * min(med["forward"])) / (
      n * min(med["forward"]))
  ddim = harness.summarize(med["ddim"])
  return {
      "ddim_steps": n,
      "ddim": ddim,
      "images_per_sec": args.batch / ddim["median_s"],
      "first_call_s": first_call_s,
      "compile_s_estimate": first_call_s - ddim["median_s"],
      "forward": harness.summarize(med["forward"]),
      "forward_compile_s": fwd_compile.total_s,
      "forward_flops_per_example": _per(harness.cost_flops(fwd), args.batch),
      "overhead": overhead,
      "overhead_target": OVERHEAD_TARGET,
      "overhead_within_target": overhead["median"] <= OVERHEAD_TARGET,
      "sampler_compilations": compilations,
      "jit_cache_size": cache_size,
  }


def _per(total: float | None, n: int) -> float | None:
  return None if total is None else total / n


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs every part; returns the JSON record."""
  shape = (args.batch, args.latent, args.latent, args.channels)
  model = get_diffusion_unet(args.size, args.channels)
  sched = diffusion.make_schedule("linear", NUM_TIMESTEPS)
  k_init, k_data = jax.random.split(jax.random.key(args.seed))
  x0 = jax.random.normal(k_data, shape)
  params = model.init(k_init, x0[:1], jnp.zeros((1,), jnp.int32))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  steps = max(1, args.steps)
  rounds = max(1, min(args.rounds, steps))
  iters = max(1, steps // rounds)

  record: dict[str, Any] = {
      "benchmark": "diffusion",
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "config": {"size": args.size, "preset": diffusion_unet_config(args.size),
                 "batch": args.batch, "shape": list(shape), "steps": steps,
                 "rounds": rounds, "iters_per_round": iters, "warmup": args.warmup,
                 "ddim_steps": args.ddim, "lr": args.lr, "schedule": "linear",
                 "num_timesteps": NUM_TIMESTEPS, "parameterization": "eps",
                 "optimizer": "adamw(weight_decay=1e-4)", "seed": args.seed,
                 "single_thread": args.single_thread,
                 "pinned_cpu": getattr(args, "pinned_cpu", None),
                 "torch_threads": (None if args.no_torch else
                                   "1" if args.single_thread else args.torch_threads)},
      "device": harness.device_info(),
      "params": {"jax": n_params},
  }

  sample_params = jax.tree.map(jnp.copy, params)  # The trainer donates `params`.
  trainer = JaxTrainer(model, sched, params, x0, args.lr, args.seed)
  comp = trainer.compile()
  flops = harness.cost_flops(comp.compiled)
  jax_train = {"lower_s": comp.lower_s, "compile_s": comp.compile_s,
               "compile_total_s": comp.total_s,
               "flops_per_example": _per(flops, args.batch),
               "memory": harness.memory_bytes(comp.compiled)}

  if args.no_torch:
    timing = harness.time_fn(trainer, warmup=args.warmup, iters=steps)
    record["speedup_vs_torch"] = None
  else:
    timing = compare_with_torch(record, trainer, args, np.asarray(x0), rounds, iters)
  jax_train.update(timing)
  jax_train["examples_per_sec"] = args.batch / timing["median_s"]
  jax_train["gflops_per_sec"] = (None if flops is None
                                 else flops / timing["median_s"] / 1e9)
  jax_train["final_loss"] = float(trainer())
  record["jax_train"] = jax_train

  record["sampling"] = bench_sampling(model, sched, sample_params, args)
  record["sampler_compilations"] = record["sampling"]["sampler_compilations"]
  record["sampler_overhead"] = record["sampling"]["overhead"]["median"]
  record["device"]["load_avg_end"] = harness.device_info().get("load_avg_1_5_15")
  return record


def summary_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
  """The printed table: one row per measured number."""
  j, s = record["jax_train"], record["sampling"]
  rows = [
      ("params (JAX)", record["params"]["jax"], ""),
      ("params (torch ref)", record["params"].get("torch"), ""),
      ("JAX train compile", j["compile_total_s"], "s (lower + compile)"),
      ("JAX train step", j["median_s"],
       f"s median (p10 {j['p10_s']:.4g}, p90 {j['p90_s']:.4g})"),
      ("JAX train throughput", j["examples_per_sec"], "examples/s"),
      ("train FLOPs / example", j["flops_per_example"], "XLA cost_analysis"),
      ("JAX achieved", j["gflops_per_sec"], "GFLOP/s"),
      ("JAX train memory", (j["memory"] or {}).get("total_bytes"),
       "bytes (args + out - aliased + temp)"),
  ]
  t = record.get("torch_train")
  if t:
    e, sp = t["eager"], record["speedup_vs_torch"]
    probe = {n: None if v is None else round(v, 4) for n, v in e["thread_probe_s"].items()}
    rows += [
        ("torch eager step", e["median_s"],
         f"s median of round medians (threads={e['threads']}; probe s {probe})"),
        ("torch eager throughput", e["examples_per_sec"], "examples/s"),
        ("speedup_vs_torch", sp["median"],
         f"torch/JAX (min {sp['min']:.3g}, max {sp['max']:.3g})"),
    ]
    if "compiled" in t:
      c, sc = t["compiled"], record["speedup_vs_torch_compile"]
      rows += [("torch.compile step", c["median_s"], f"s (compile {c['compile_s']:.1f} s)"),
               ("speedup_vs_torch_compile", sc["median"],
                f"torch/JAX (min {sc['min']:.3g}, max {sc['max']:.3g})")]
    else:
      rows.append(("torch.compile", None, t["compile_status"]))
  o = s["overhead"]
  rows += [
      (f"DDIM-{s['ddim_steps']} call", s["ddim"]["median_s"], "s median"),
      ("DDIM throughput", s["images_per_sec"], "images/s"),
      ("UNet forward", s["forward"]["median_s"], "s median (jitted, same batch)"),
      ("sampler overhead", o["median"],
       f"(DDIM - n*fwd)/(n*fwd) per round: min {o['min']:.3g}, max {o['max']:.3g}; "
       f"fastest rounds {o['from_min_times']:.3g}; target <= {s['overhead_target']}"),
      ("sampler first call", s["first_call_s"], "s (compile + 1 run)"),
      ("sampler_compilations", s["sampler_compilations"],
       f"model traces over 2 calls (jit cache size {s['jit_cache_size']})"),
  ]
  return [dict(zip(("metric", "value", "note"), r)) for r in rows]


def use_single_thread() -> int | None:
  """Runs both frameworks on one core; must run before JAX's backend starts.

  Pins this process to one CPU (threads created later inherit it) and turns
  off XLA's multi-threaded Eigen kernels, so neither framework oversubscribes
  the core with spinning pool threads. Torch gets one thread in
  ``build_torch``.

  Returns:
    The CPU pinned to, or None where affinity is not supported.

  Raises:
    RuntimeError: the JAX backend is already initialized (the flag would be ignored).
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  initialized = getattr(xla_bridge, "backends_are_initialized", lambda: False)
  if initialized():
    raise RuntimeError("--single-thread must be applied before JAX initializes its "
                       "backend (run it as the entry point)")
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  if not hasattr(os, "sched_setaffinity"):
    return None
  cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})
  return cpu


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.single_thread:
    args.pinned_cpu = use_single_thread()
  record = run(args)
  c = record["config"]
  print(f"\ndiffusion benchmark: size={c['size']} batch={c['batch']} shape={c['shape']} "
        f"on {record['device']['platform']} ({record['device']['cpu_model']}, "
        f"load {record['device'].get('load_avg_1_5_15')})")
  harness.print_table(summary_rows(record), ["metric", "value", "note"])
  path = harness.write_json(record, args.json, name=f"diffusion-{args.size}")
  print(f"wrote {path}")
  return record


if __name__ == "__main__":
  main()
