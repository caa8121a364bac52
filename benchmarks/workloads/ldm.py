"""LDM workloads: the latent UNet train step, the KL-VAE step and DDIM-50 sampling.

``ldm_unet`` is the ``ldm`` method's stage ``unet`` step (ε-prediction
L_simple on posterior samples of cached VAE latents, AdamW, EMA update), with
A/B rounds against ``benchmarks.torch_ref.diffusion_unet`` when torch is
installed. The step never calls the VAE (latents are cached), so the
benchmark gives the stage its latent channel count instead of a trained VAE
run. ``vae`` is stage ``vae`` (L1 + KL, no discriminator, as in the first
phase of training). ``ddim50`` is the sampler the sample and eval stages use
(``diffusion.make_sampler``, one compiled ``lax.scan``), timed per call.
"""
from __future__ import annotations

import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops, harness, steps, torch_ab
from benchmarks.workloads.common import (Options, abstract_fn, abstract_record,
                                         measure_config, row, torch_compare)
from medrep_jax import config_lib, diffusion
from medrep_jax.methods.ldm_parts import common as ldm_common
from medrep_jax.models.diffusion_unet import diffusion_unet_config

# size: DiffusionUNet preset; latent: latent height = width; channels: latent channels.
UNET = {
    "quick": dict(size="tiny", latent=8, channels=3, batch=8),
    "cpu": dict(size="small", latent=16, channels=3, batch=16),
    "gpu": dict(size="ldm", latent=64, channels=3, batch=64),
}
# size: VAE preset; image: pixels (grayscale, as the paper's X-rays).
VAE = {
    "quick": dict(size="tiny", image=16, batch=8),
    "cpu": dict(size="tiny", image=64, batch=8),
    "gpu": dict(size="paper", image=256, batch=16),
}
DDIM_STEPS = 50


def stage_config(stage: str, opts: Options, model_size: str, batch: int) -> Any:
  base = "tiny" if opts.suite == "quick" else "paper"
  ldm_config = config_lib.config_module("ldm", config_lib.CONFIG_DIR)
  c = ldm_config.stage_config(stage, data="phantoms", size=base)
  c.model.size = model_size
  c.train.update(batch_size=int(batch), eval_batch_size=int(batch), num_steps=1000,
                 progress=False)
  c.dtype = opts.compute_dtype
  return c


def latent_stage(channels: int):
  """A ``prepare`` hook: the stage's VAE, as far as its train step needs one."""

  def prepare(method: Any) -> None:
    # The step reads only the latent channel count of the VAE (latents are cached).
    method.__dict__["vae"] = types.SimpleNamespace(latent_channels=channels)
  return prepare


def unet_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]) -> tuple[float, float]:
  z = batch["mean"]
  t = jax.ShapeDtypeStruct((z.shape[0],), jnp.int32)
  fwd = flops.count_flops(lambda p, x, t: method.model.apply({"params": p}, x, t),
                          flops.abstract(state.params), jax.ShapeDtypeStruct(z.shape, z.dtype), t)
  return fwd, 0.0



def unet_factory(config: Any, x0: np.ndarray) -> torch_ab.TorchFactory:
  """Torch DDPM steps (AdamW) of the reference UNet of the same preset."""

  def make(amp: bool, channels_last: bool, compile_: bool):
    import torch  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from benchmarks.torch_ref import diffusion_unet as ref
    dev = torch_ab.device()
    c = x0.shape[-1]
    model = ref.unet_from_config(diffusion_unet_config(config.model.size), c, c).to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch_ab.autocast_module(model) if amp else model
    step = ref.DDPMTrainStep(torch.compile(net) if compile_ else net,
                             lr=float(config.optim.lr),
                             weight_decay=float(config.optim.weight_decay),
                             num_timesteps=int(config.diffusion.num_timesteps))
    x = torch.from_numpy(x0).permute(0, 3, 1, 2).contiguous(memory_format=fmt).to(dev)
    return lambda: step(x)

  return make


def unet_setup(opts: Options) -> tuple[Any, dict[str, np.ndarray], Any]:
  """(config, batch of cached posterior latents, prepare hook) at the suite's size."""
  s = opts.size(UNET)
  c = stage_config("unet", opts, s["size"], s["batch"])
  shape = (s["batch"], s["latent"], s["latent"], s["channels"])
  rng = np.random.default_rng(opts.seed)
  batch = {"mean": rng.standard_normal(shape).astype(np.float32),
           "logvar": np.full(shape, -4.0, np.float32)}
  return c, batch, latent_stage(s["channels"])


def run_unet(opts: Options) -> list[dict[str, Any]]:
  s = opts.size(UNET)
  c, batch, prepare = unet_setup(opts)
  compare = torch_compare(opts, lambda bench, record: unet_factory(c, batch["mean"]))
  rec = measure_config(c, batch, opts, analytic=unet_analytic,
                       prepare=prepare, compare=compare)
  return [row("ldm_unet", f"{s['size']} {s['latent']}x{s['latent']}x{s['channels']} "
                          f"B{s['batch']} {c.dtype}", rec)]


def vae_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]) -> tuple[float, float]:
  x = batch["image"]
  fwd = flops.count_flops(lambda p, x, r: method.model.apply({"params": p}, x, r),
                          flops.abstract(state.params), jax.ShapeDtypeStruct(x.shape, x.dtype),
                          jax.random.key(0))
  return fwd, 0.0


def run_vae(opts: Options) -> list[dict[str, Any]]:
  s = opts.size(VAE)
  c = stage_config("vae", opts, s["size"], s["batch"])
  c.data.image_size, c.data.channels = s["image"], 1
  rng = np.random.default_rng(opts.seed)
  batch = {"image": rng.random((s["batch"], s["image"], s["image"], 1), np.float32)}
  rec = measure_config(c, batch, opts, analytic=vae_analytic)
  return [row("vae", f"{s['size']} {s['image']}px B{s['batch']} {c.dtype}", rec)]


def run_ddim(opts: Options) -> list[dict[str, Any]]:
  """DDIM-50 sampling of the latent UNet: images/s, compile, FLOPs, memory."""
  s = opts.size(UNET)
  c = stage_config("unet", opts, s["size"], s["batch"])
  unet = ldm_common.latent_unet(c, s["channels"])
  sched = diffusion.make_schedule(c.diffusion.schedule, int(c.diffusion.num_timesteps))
  shape = (s["batch"], s["latent"], s["latent"], s["channels"])
  args = (jax.random.key(opts.seed), jnp.zeros(shape), jnp.zeros((shape[0],), jnp.int32))
  # Options.abstract: shapes only, nothing is initialized.
  params = (jax.eval_shape(unet.init, *args) if opts.abstract
            else jax.jit(unet.init)(*args))["params"]
  sample = diffusion.make_sampler(lambda p, x, t, _: unet.apply({"params": p}, x, t), sched,
                                  shape, sampler="ddim", num_steps=DDIM_STEPS, eta=0.0,
                                  parameterization=c.diffusion.parameterization)
  rng = jax.random.key(opts.seed + 1)
  fwd = flops.count_flops(lambda p, x, t: unet.apply({"params": p}, x, t), flops.abstract(params),
                          jax.ShapeDtypeStruct(shape, jnp.float32),
                          jax.ShapeDtypeStruct((shape[0],), jnp.int32))
  point = f"{s['size']} {s['latent']}x{s['latent']}x{s['channels']} B{s['batch']} {c.dtype}"
  if opts.abstract:
    rec, lowered = abstract_fn(opts, sample, params, rng)
    return [row("ddim50", point, abstract_record(rec, DDIM_STEPS * fwd, shape[0],
                                                 str(c.dtype), opts, lowered),
                ddim_steps=DDIM_STEPS)]
  comp = harness.compile_time(sample, params, rng)
  xla = harness.cost_flops(comp.compiled)
  mem, peak = steps.memory_peak(comp.compiled)
  probe = steps.timed(lambda: sample(params, rng), warmup=1, iters=1)["median_s"]
  timing = steps.timed(lambda: sample(params, rng), warmup=0, iters=opts.iters(probe))
  rec = {"lower_s": comp.lower_s, "compile_s": comp.compile_s, "memory": mem,
         "memory_peak_bytes": peak, "ddim_steps": DDIM_STEPS, "dtype": str(c.dtype),
         "flops_per_example_xla": None if xla is None else xla / shape[0],
         "times": timing["times"], "jit_cache_size": steps.jit_cache_size(sample),
         "device_peak_bytes": steps.device_peak_bytes()}
  steps.throughput(rec, timing, shape[0], DDIM_STEPS * fwd, opts.peak)
  return [row("ddim50", point, rec)]
