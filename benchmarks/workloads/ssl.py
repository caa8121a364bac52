"""DCL-CsTP and its baselines (MoCo-v2, SimCLR, SimSiam): the real pretraining steps.

Workloads:
  ``dcl_cstp``: the dual-stream step (three strong views through F + T + h as
    one batch, momentum F_m + T_m on two, bank of K keys, SGD), with the
    on-device augmentation timed separately and, with torch installed, A/B
    rounds against ``benchmarks.torch_ref.dual_stream`` on the same weights and
    the same augmented views (``speedup_vs_torch``).
  ``dcl_cstp_bank``: the same step with K and 16 x K keys, timed in
    alternating rounds; ``bank_step_ratio`` = step(16 K) / step(K), the median of
    per-round ratios, should stay within a few percent of 1 (``--check`` fails
    it above 1.05 on accelerators and 1.10 on CPU, where shared machines make
    single steps vary by more than the bank costs). ``bank_flops_ratio`` is
    XLA's FLOP count of the two programs, the deterministic side of the same claim.
  ``dcl_cstp_sweep``: more batch sizes and image sizes.
  ``mocov2``, ``simclr``, ``simsiam``: the baseline presets of the same method.

FLOPs: the analytic count is 3 x the forward of the online network over all
views + the momentum network's two forwards (``flops.train_step_flops``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops, guards, harness, steps, torch_ab
from benchmarks.workloads.common import (BANK_ROUNDS, Options, measure_config, row,
                                         torch_compare)
from medrep_jax import config_lib
from medrep_jax.data import augment
from medrep_jax.methods.dcl_cstp import ContrastiveNet
from medrep_jax.core import memory_bank
from medrep_jax.core import mesh as mesh_lib

# tiny: configs/dcl_cstp.py's size=tiny heads and the 3x3-stem encoder (small_input).
MAIN = {
    "quick": dict(encoder="resnet_tiny", tiny=True, image_size=32, batch=8, bank=64),
    "cpu": dict(encoder="resnet50", tiny=False, image_size=96, batch=16, bank=4096),
    "gpu": dict(encoder="resnet50", tiny=False, image_size=224, batch=128, bank=4096),
}
BASELINES = {
    "quick": MAIN["quick"],
    "cpu": dict(MAIN["cpu"], encoder="resnet18"),
    "gpu": dict(MAIN["gpu"], batch=256),
}
# (encoder, batch, image size) points besides the main one. On CPU a ResNet-50
# point costs ~1.5 min of compilation, so the CPU sweep uses ResNet-18.
SWEEP = {
    "quick": [("resnet_tiny", 16, 32), ("resnet_tiny", 8, 48)],
    "cpu": [("resnet18", 8, 96), ("resnet18", 32, 96), ("resnet18", 16, 128)],
    "gpu": [("resnet50", 64, 224), ("resnet50", 256, 224), ("resnet50", 128, 160)],
}
BANK_GROWTH = 16
FLAT_TOLERANCE = {"cpu": 0.10}  # Other platforms: 0.05.


def ssl_config(variant: str, opts: Options, *, encoder: str, tiny: bool, image_size: int,
               batch: int, bank: int) -> Any:
  """A ``configs/dcl_cstp.py`` config at benchmark size (RGB images, as ImageNet ResNets)."""
  dcl_cstp = config_lib.config_module("dcl_cstp", config_lib.CONFIG_DIR)
  c = dcl_cstp.dcl_cstp_config(variant=variant, data="phantoms",
                               size="tiny" if tiny else "paper")
  c.model.encoder, c.model.small_input = encoder, tiny
  c.data.image_size, c.data.channels = int(image_size), 3
  c.train.update(batch_size=int(batch), eval_batch_size=int(batch), num_steps=1000,
                 progress=False)
  c.loss.bank_size = int(bank)
  c.dtype = opts.compute_dtype
  return c


def ssl_batch(config: Any, seed: int) -> dict[str, np.ndarray]:
  """A loader-shaped batch: images in [0, 1] and dataset indices."""
  b, s = int(config.train.batch_size), int(config.data.image_size)
  rng = np.random.default_rng(seed)
  return {"image": rng.random((b, s, s, 3), np.float32), "index": np.arange(b, dtype=np.int32)}



def ssl_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]) -> tuple[float, float]:
  """(online forward over all views, momentum forwards) in FLOPs."""
  img = batch["image"]
  b, v = img.shape[0], method.num_views
  views = lambda n: jax.ShapeDtypeStruct((n,) + img.shape[1:], jnp.float32)
  net = method.model
  online = flops.abstract({"params": state.params, **state.model_state})
  trained = flops.count_flops(
      lambda var, x: net.apply(var, x, True, v, method=ContrastiveNet.embed_and_predict,
                               mutable=["batch_stats"]), online, views(v * b))
  if not method.uses_bank:
    return trained, 0.0
  mom = flops.abstract({"params": state.extras["momentum_params"],
                   "batch_stats": state.extras["momentum_stats"]})
  key = flops.count_flops(lambda var, x: net.apply(var, x, True, method=ContrastiveNet.embed,
                                                   mutable=["batch_stats"]), mom, views(b))
  return trained, 2.0 * key


def point(c: Any) -> str:
  bank = f" K{c.loss.bank_size}" if c.loss.global_stream != "none" else ""
  return (f"{c.model.encoder} {c.data.image_size}px B{c.train.batch_size}{bank} "
          f"{c.dtype}")


def make_views(config: Any, method: Any, batch: Mapping[str, jax.Array], seed: int):
  """The step's augmented views of ``batch`` (as the step makes them) and their timing."""
  fn = jax.jit(lambda rng, img, idx: augment.make_views(
      rng, img, config.augment.policy, method.num_views, indices=idx,
      out_size=int(config.data.image_size), **method.augment_kwargs))
  rng = jax.random.key(seed)
  timing = harness.time_fn(lambda: fn(rng, batch["image"], batch["index"]), warmup=1, iters=3)
  return fn(rng, batch["image"], batch["index"]), timing["median_s"]


def dual_stream_factory(config: Any, state: Any, views: jax.Array) -> torch_ab.TorchFactory:
  """Torch dual-stream steps on copies of the JAX weights, bank and views."""
  host_state, host_views = jax.device_get(state), np.asarray(jax.device_get(views))

  def make(amp: bool, channels_last: bool, compile_: bool):
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks.torch_ref import dual_stream  # pylint: disable=import-outside-toplevel
    dev = torch_ab.device()
    step = dual_stream.DualStreamStep(dual_stream.net_from_config(config).to(dev), config,
                                      amp=amp, channels_last=channels_last, compile=compile_)
    step.load_jax_state(host_state)
    x = torch.from_numpy(host_views).permute(0, 1, 4, 2, 3).contiguous().to(dev)
    return lambda: step(x)

  return make


def run_dcl(opts: Options) -> list[dict[str, Any]]:
  c = ssl_config("dcl_cstp", opts, **opts.size(MAIN))
  views: dict[str, jax.Array] = {}
  ab = torch_compare(opts, lambda bench, record: dual_stream_factory(c, bench.state,
                                                                     views["views"]))

  def compare(bench: steps.StepBench, record: dict) -> dict:
    views["views"], record["augment_s"] = make_views(c, bench.method, bench.batch, opts.seed)
    return ab(bench, record)

  rec = measure_config(c, ssl_batch(c, opts.seed), opts, analytic=ssl_analytic,
                       compare=compare)
  if "augment_s" in rec:  # Not in an abstract (trace-only) record.
    rec["augment_share"] = rec["augment_s"] / rec["step_s"]
  return [row("dcl_cstp", point(c), rec)]


def _with_bank(bench: steps.StepBench, num_keys: int) -> Any:
  """A copy of the bench's state whose bank holds ``num_keys`` fresh unit keys."""
  state = jax.tree.map(jnp.copy, bench.state)  # Donation must not free the other's buffers.
  dim = state.extras["bank"].shape[1]
  bank, ptr = memory_bank.init_bank(jax.random.key(1), num_keys, dim)
  extras = dict(state.extras, bank=jax.device_put(bank, memory_bank.bank_sharding(bench.mesh)),
                bank_ptr=jax.device_put(ptr, mesh_lib.replicated(bench.mesh)))
  return state.replace(extras=extras)


def run_bank(opts: Options) -> list[dict[str, Any]]:
  size = opts.size(MAIN)
  small, big = size["bank"], size["bank"] * BANK_GROWTH
  if opts.abstract:  # Each program traced on its own.
    configs = [ssl_config("dcl_cstp", opts, **dict(size, bank=k)) for k in (small, big)]
    # The K program is dcl_cstp's: a run with a shared compile cache loads it, compiled once.
    return [row("dcl_cstp_bank", point(c), dict(
        measure_config(c, ssl_batch(c, opts.seed), opts, analytic=ssl_analytic),
        bank_size=c.loss.bank_size, **({"same_program_as": "dcl_cstp"} if k == small else {})))
            for k, c in zip((small, big), configs)]
  c = ssl_config("dcl_cstp", opts, **size)
  rows = []
  with steps.built(c, ssl_batch(c, opts.seed), devices=opts.devices()) as bench:
    other = bench.with_state(_with_bank(bench, big))
    records = {small: bench.compile(), big: other.compile()}
    benches = {small: bench, big: other}
    probe = max(steps.timed(b, warmup=opts.timing["warmup"], iters=1)["median_s"]
                for b in benches.values())
    rounds = max(BANK_ROUNDS, opts.timing["rounds"]) if not opts.dry_run else 1
    with jax.transfer_guard("disallow"):
      med = harness.interleave({str(k): b for k, b in benches.items()}, rounds,
                               iters=torch_ab.iters_per_round(probe, opts.timing["budget_s"],
                                                              rounds), warmup=0)
    ratio = guards.flat_ratio(med[str(small)], med[str(big)])
    model = steps.model_flops(bench, ssl_analytic)
    for k, rec in records.items():
      timing = harness.summarize(med[str(k)])
      steps.throughput(rec, timing, bench.batch_size, model, opts.peak)
      rec.update(bank_size=k, times=timing["times"], dtype=str(c.dtype),
                 compiles=bench.counter["traces"])
      if k == big:
        tol = FLAT_TOLERANCE.get(jax.devices()[0].platform, 0.05)
        # Not judged at --quick size (-O0 programs of ~0.1 s are all noise) or in a dry run.
        flat = None if opts.suite == "quick" or opts.dry_run else ratio["median"] <= 1 + tol
        rec.update(bank_step_ratio=ratio["median"], bank_step_ratio_fastest=ratio["min_over_min"],
                   bank_flat=flat, bank_flat_tolerance=tol,
                   bank_flops_ratio=_ratio(rec.get("flops_per_example_xla"),
                                           records[small].get("flops_per_example_xla")))
      c.loss.bank_size = k
      rows.append(row("dcl_cstp_bank", point(c), rec))
  return rows


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def run_sweep(opts: Options) -> list[dict[str, Any]]:
  base, rows = opts.size(MAIN), []
  for encoder, batch, image_size in opts.size(SWEEP):
    c = ssl_config("dcl_cstp", opts, **dict(base, encoder=encoder, batch=batch,
                                             image_size=image_size))
    rows.append(row("dcl_cstp_sweep", point(c),
                    measure_config(c, ssl_batch(c, opts.seed), opts, analytic=ssl_analytic)))
  return rows


def baseline(variant: str):
  """The runner of a baseline preset (``mocov2``, ``simclr``, ``simsiam``)."""

  def run(opts: Options) -> list[dict[str, Any]]:
    c = ssl_config(variant, opts, **opts.size(BASELINES))
    return [row(variant, point(c), measure_config(c, ssl_batch(c, opts.seed), opts,
                                                  analytic=ssl_analytic))]

  return run

