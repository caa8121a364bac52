"""LTDiff++ workloads: the latent DDPM train step and the radiomic feature extractor.

``ltdiff_ddpm`` is the ``ltdiff`` method's stage ``latent_ddpm`` step
(``ltdiff_parts.latent_ddpm.LatentDDPMStage``): the ε-prediction
``DiffusionUNet`` with ``concat_channels`` = latent channels on x_t = noised Z_B
concatenated with Z_A, L_simple, Adam and the EMA update, on a synthetic batch
{"z_a", "z_b"} of the latent shape the ``ae`` stage of the same preset gives.
The step never calls the autoencoder (latents are cached), so instead of a
finished ``ae`` run (``ae_from``) the config carries ``data_info`` with the
latent channel count: the record a finished run keeps so that its model builds
without the ae or the data (``LatentDDPMStage.info``). A/B rounds against
``benchmarks.torch_ref.diffusion_unet`` (the same UNet, built from the flax
module's settings, with Adam and the EMA; the latent normalization, two
elementwise ops on the latents, is left out) when torch is installed.

``radiomics`` times the host NumPy extractor of the concordance study
(``eval.radiomics.rois.roi_features``: every class; ID and GOH on HU, IH and
the texture classes at 32 fixed bins over [-1000, 1000] HU) on CT-like slices
(the procedural phantoms read as HU, as ``ltdiff``'s ``data=phantoms``) with a
disk mask over ~79% of the ROI, then each feature class alone
(``radiomics.extract(classes=(c,))``; every discretised class discretises
again, so the class times add up to more than the whole) and the
discretisation alone. It runs on the host CPU in every suite.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops, steps, torch_ab
from benchmarks.workloads.common import Options, measure_config, row, torch_compare
from medrep_jax import config_lib
from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.sources import SourceInfo
from medrep_jax.eval import radiomics
from medrep_jax.eval.radiomics import rois
from medrep_jax.methods.ltdiff_parts import data as ltdiff_data
from medrep_jax.methods.ltdiff_parts.latent_ddpm import LATENT_KEYS

# size: configs/ltdiff.py preset (the latent shape of its ae, its denoiser); batch: latents.
DDPM = {
    "quick": dict(size="tiny", batch=8),
    "cpu": dict(size="small", batch=16),
    "gpu": dict(size="paper", batch=64),
}
# image: ROI side in pixels; count: ROIs (distinct slices) per timed call.
RADIOMICS = {
    "quick": dict(image=32, count=4),
    "cpu": dict(image=128, count=32),
    "gpu": dict(image=128, count=32),
}
N_BINS = 32


def _configs():
  return config_lib.config_module("ltdiff", config_lib.CONFIG_DIR)


def latent_shape(size: str) -> tuple[int, int]:
  """(side, channels) of the ae latent of configs/ltdiff.py preset ``size``: the UNet++
  bottleneck, image_size / 2^(depth - 1), through a 1x1 conv to ``latent_channels``."""
  s = _configs().SIZES[size]
  return s["image_size"] // 2 ** (len(s["widths"]) - 1), int(s["latent_channels"])


def ddpm_setup(opts: Options) -> tuple[Any, dict[str, np.ndarray]]:
  """(config, batch of cached latent pairs {"z_a", "z_b"}) at the suite's size."""
  s = opts.size(DDPM)
  side, channels = latent_shape(s["size"])
  c = _configs().latent_ddpm_config(size=s["size"], data="phantoms")
  c.train.update(batch_size=s["batch"], eval_batch_size=s["batch"], num_epochs=0.0,
                 num_steps=1000, progress=False)
  c.dtype = opts.compute_dtype
  # What a finished run records of its data (trainer.record_data_info): the latents' info.
  c.data_info = dataclasses.asdict(SourceInfo(
      name="synthetic_latent_pairs", num_classes=0, class_names=(), channels=channels,
      image_dtype="float32"))
  rng = np.random.default_rng(opts.seed)
  shape = (s["batch"], side, side, channels)
  return c, {k: rng.standard_normal(shape).astype(np.float32) for k in LATENT_KEYS}


def ddpm_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]
                  ) -> tuple[float, float]:
  """Conv + matmul FLOPs of ε_θ(x_t, t, concat=Z_A), the trained forward."""
  z = jax.ShapeDtypeStruct(batch["z_b"].shape, batch["z_b"].dtype)
  t = jax.ShapeDtypeStruct((z.shape[0],), jnp.int32)
  fwd = flops.count_flops(lambda p, x, t, cond: method.eps_fn(p)(x, t, cond),
                          flops.abstract(state.params), z, t, z)
  return fwd, 0.0


def ddpm_factory(config: Any, unet: Any, n_params: int,
                 batch: Mapping[str, np.ndarray]) -> torch_ab.TorchFactory:
  """Torch steps of the reference UNet of the flax ``unet`` (Adam, EMA), on Z_B given Z_A.

  Raises:
    RuntimeError: the torch UNet's parameter count is not ``n_params`` (the JAX one's).
  """

  def make(amp: bool, channels_last: bool, compile_: bool):
    import torch  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from benchmarks.torch_ref import diffusion_unet as ref
    dev = torch_ab.device()
    model = ref.unet_from_flax(unet, batch["z_b"].shape[-1])
    if ref.count_params(model) != n_params:
      raise RuntimeError(f"torch reference UNet has {ref.count_params(model)} parameters, "
                         f"the JAX denoiser {n_params}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev).to(memory_format=fmt)
    net = torch_ab.autocast_module(model) if amp else model
    step = ref.DDPMTrainStep(torch.compile(net) if compile_ else net,
                             lr=float(config.optim.lr),
                             weight_decay=float(config.optim.weight_decay),
                             num_timesteps=int(config.diffusion.num_timesteps),
                             optimizer="adam", ema_decay=float(config.ema_decay))
    z_a, z_b = (torch.from_numpy(batch[k]).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
                .to(dev) for k in LATENT_KEYS)
    return lambda: step(z_b, cond=z_a)

  return make


def run_ddpm(opts: Options) -> list[dict[str, Any]]:
  s = opts.size(DDPM)
  c, batch = ddpm_setup(opts)

  compare = torch_compare(opts, lambda bench, record: ddpm_factory(
      c, bench.method.model, record["params"], batch), count_params=True)

  rec = measure_config(c, batch, opts, analytic=ddpm_analytic, compare=compare)
  _, side, _, channels = batch["z_b"].shape
  return [row("ltdiff_ddpm", f"{s['size']} {side}x{side}x{channels} (+{channels} concat) "
                             f"B{s['batch']} {c.dtype}", rec)]


# ------------------------------------------------------------------ radiomics


def ct_slices(size: int, count: int, seed: int) -> list[np.ndarray]:
  """``count`` CT-like slices in HU: the procedural phantoms read as HU over
  ``ltdiff_parts.data.PHANTOM_HU`` (air -1000 HU, soft tissue, lungs, ribs, noise)."""
  lo, hi = ltdiff_data.PHANTOM_HU
  phantoms = Phantoms("train", num_examples=count, image_size=size, channels=1, seed=seed)
  return [lo + phantoms[i]["image"][..., 0].astype(np.float64) * ((hi - lo) / 255)
          for i in range(count)]


def disk_mask(size: int) -> np.ndarray:
  """The disk inscribed in a ``size`` x ``size`` box (~79% of it)."""
  yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
  return yy ** 2 + xx ** 2 <= (size / 2) ** 2


def run_radiomics(opts: Options) -> list[dict[str, Any]]:
  """ROIs/s and features/s of ``roi_features``, and each class alone, in seconds per ROI."""
  s = opts.size(RADIOMICS)
  images = ct_slices(s["image"], s["count"], opts.seed)
  roi = rois.Roi(0, 0, disk_mask(s["image"]))
  lo, hi = rois.WHOLE_RANGE
  bins = dict(n_bins=N_BINS, lo=lo, hi=hi)
  features = functools.partial(rois.roi_features, roi=roi, **bins)
  parts: dict[str, Callable[[np.ndarray], Any]] = {
      c: functools.partial(radiomics.extract, mask=roi.mask, classes=(c,), **bins)
      for c in radiomics.CLASSES}
  parts["discretise"] = functools.partial(radiomics.grey_levels, mask=roi.mask, **bins)
  n_features = len(features(images[0]))
  every = lambda fn: lambda: [fn(image) for image in images]
  probe = steps.timed(every(features), warmup=1, iters=1)["median_s"]
  iters = opts.iters(probe)
  setting = f"{s['image']}px ROI, {roi.mask.mean():.0%} mask, {N_BINS} bins, on the host"

  def record(timing: Mapping[str, Any], per: int, **extra: Any) -> dict[str, Any]:
    """Seconds per ROI (or per feature) and ROIs (features) per second."""
    return {"step_s": timing["median_s"] / per, "p10_s": timing["p10_s"] / per,
            "p90_s": timing["p90_s"] / per, "examples_per_sec": per / timing["median_s"],
            "times": timing["times"], "rois_per_call": s["count"], "image": s["image"],
            "n_bins": N_BINS, **extra}

  whole = steps.timed(every(features), warmup=0, iters=iters)
  out = [row("radiomics", f"roi_features {setting} [s/ROI, ROIs/s]",
             record(whole, s["count"], n_features=n_features,
                    features_per_sec=n_features * s["count"] / whole["median_s"])),
         row("radiomics", f"  = {n_features} features per ROI [s/feature, features/s]",
             record(whole, s["count"] * n_features, n_features=n_features))]
  for name, fn in parts.items():
    what = (f"discretisation alone ({N_BINS} bins)" if name == "discretise" else
            f"class {name} alone ({len(fn(images[0]))} features)")
    out.append(row("radiomics", f"  {what} [s/ROI, ROIs/s]",
                   record(steps.timed(every(fn), warmup=1, iters=iters), s["count"],
                          part=name)))
  return out
