"""LDM stage `unet`: ε-prediction latent diffusion on frozen-VAE latents (eq. 2).

The VAE encoder costs about as much as a UNet step, so the train split is encoded once
(posterior mean and log-variance, cached in WORKDIR/latents_train.npz) and each step draws
z = mean + σ·ε from the cached posterior, scaled by the LDM scale factor 1/std(z). The EMA
of the UNet parameters is `state.extras["ema"]` (optax.incremental_update) and is what
sampling uses. Evaluation samples latents with DDIM, decodes them and reports the Frechet
distance and KID to held-out real images in a pluggable feature space.
"""
from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax import diffusion
from medrep_jax.data import arrays, subsets
from medrep_jax.data import loader
from medrep_jax.data.sources import SourceInfo
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import generative
from medrep_jax import methods
from medrep_jax.methods import base
from medrep_jax.methods.ldm_parts import common


class UNetStage(base.EMAParams, base.Method):
  """Trains the latent `DiffusionUNet` with L_simple (ε-prediction)."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    d = config.diffusion
    self.sched = diffusion.make_schedule(d.schedule, int(d.num_timesteps))
    self._real_feats = None
    self._feature_net = None

  @functools.cached_property
  def vae(self) -> common.LoadedVAE:
    return common.load_vae(self.config.vae_from)

  @functools.cached_property
  def model(self):
    return common.latent_unet(self.config, self.vae.latent_channels)

  # ---- data: cached latents of the train split
  def make_source(self, split: str):
    if split != "train":
      return super().make_source(split)
    cache = pathlib.Path(self.workdir) / "latents_train.npz"
    info = SourceInfo(name="latents", num_classes=0, class_names=(),
                      channels=self.vae.latent_channels, image_dtype="float32")
    if cache.exists():
      return arrays.ArraySource.load(cache, info)
    images = super().make_source("train")
    limit = int(self.config.train.get("max_train_examples", 0) or 0)
    if 0 < limit < len(images):
      images = subsets.spread_subset(images, limit)
    mean, logvar = self.vae.encode_source(images, super().transforms("train"),
                                          batch_size=int(self.config.train.eval_batch_size))
    src = arrays.ArraySource({"mean": mean, "logvar": logvar}, info)
    if jax.process_index() == 0:
      src.save(cache)
    return src

  def transforms(self, split: str) -> list:
    # Train records are cached latents (no transforms); images (the latent cache's input
    # and the FD reference) get the data transforms.
    return [] if split == "train" else super().transforms(split)

  # ---- state
  def init_variables(self, rng, batch):
    z = batch["mean"]
    return self.model.init(rng, z, jnp.zeros((z.shape[0],), jnp.int32))

  def init_extras(self, rng, batch, params, model_state):
    """EMA weights, and the latent normalization fixed from the first batch: LDM's scale
    factor 1/std, plus a per-channel shift (KL-VAE latents are not zero-mean; a shift keeps
    the diffusion target centred, which an undertrained UNet otherwise turns into drift)."""
    z = batch["mean"]
    sample = z + jnp.exp(0.5 * batch["logvar"]) * jax.random.normal(rng, z.shape)
    shift = jnp.mean(sample, axis=(0, 1, 2)) if self.config.latent_shift else jnp.zeros(
        z.shape[-1])
    scale = 1.0 / jnp.maximum(jnp.std(sample - shift), 1e-6)
    return {"ema": params, "scale_factor": scale, "latent_shift": shift}

  def loss_fn(self, params, state, batch, rng):
    """L_simple (eq. 2) on z0 drawn from the cached posterior and normalized."""
    k_z, k_diff = jax.random.split(rng)
    eps = jax.random.normal(k_z, batch["mean"].shape)
    z = batch["mean"] + jnp.exp(0.5 * batch["logvar"]) * eps
    z0 = (z - state.extras["latent_shift"]) * state.extras["scale_factor"]
    model_fn = lambda x, t, c: self.model.apply({"params": params}, x, t)
    out = diffusion.training_losses(self.sched, model_fn, z0, k_diff,
                                    parameterization=self.config.diffusion.parameterization)
    return jnp.mean(out["loss"]), {}

  # ---- sampling: used by the eval below and by the `sample` stage
  def sample(self, extras, *, num: int, seed: int, num_steps: int, sampler: str = "ddim",
             sample_cfg=None, progress: bool = False) -> np.ndarray:
    """`num` decoded images in [0, 1] from the EMA weights in `extras` (see
    `common.sample_images`); `sample_cfg` defaults to this run's `config.sample`."""
    return common.sample_images(
        self.model, self.sched, self.vae, extras["ema"], float(extras["scale_factor"]),
        extras["latent_shift"], sample_cfg or self.config.sample,
        self.config.diffusion.parameterization, num=num, seed=seed, num_steps=num_steps,
        sampler=sampler, mesh=self.mesh, progress=progress)

  # ---- eval: sample, decode, FD/KID against held-out real images
  def _real(self, num: int) -> np.ndarray:
    split = self.config.train.eval_split
    return loader.collect(super().make_source(split), self.transforms(split),
                          limit=num)["image"]

  def evaluate_state(self, state, ctx):
    e = self.config.eval
    if self._feature_net is None:
      self._feature_net = methods.feature_net(e.feature_net,
                                              e.feature_net_path or self.config.vae_from)
      self._real_feats = self._feature_net(self._real(int(e.num_samples)))
    fake = self.sample(state.extras, num=int(e.num_samples), seed=int(self.config.seed) + 1,
                       num_steps=int(e.ddim_steps))
    metrics = generative.generative_metrics(self._real_feats, self._feature_net(fake),
                                            label=self._feature_net.label,
                                            num_boot=int(e.num_boot))
    label = metrics.pop("feature_net")
    out_dir = pathlib.Path(ctx.workdir) / "samples"
    out_dir.mkdir(exist_ok=True)
    path = fig_lib.image_grid(fake[:16], out_dir / f"step_{ctx.step:07d}.png", nrow=8)
    if not ctx.final:
      return base.Result(metrics)
    return base.Result(metrics, {
        f"samples at step {ctx.step} (FD {metrics['fd']:.3g} in {label})":
            os.path.relpath(path, ctx.workdir)}, [
        "## Frechet distance over training", "",
        f"Feature network: {label}. FD and KID are computed on {e.num_samples} DDIM-"
        f"{e.ddim_steps} samples (EMA weights) against as many held-out real images; "
        f"`fd_lo`/`fd_hi` are 95% bootstrap bounds (see metrics.jsonl)."])
