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
import optax

from medrep_jax import diffusion
from medrep_jax.data import arrays
from medrep_jax.data import loader
from medrep_jax.data.sources import SourceInfo
from medrep_jax.eval import feature_nets
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import generative
from medrep_jax.methods import base
from medrep_jax.methods.ldm_parts import common
from medrep_jax.train import optim
from medrep_jax.train.state import TrainState


class UNetStage(base.Method):
  """Trains the latent `DiffusionUNet` with L_simple (ε-prediction)."""

  def __init__(self, config):
    super().__init__(config)
    d = config.diffusion
    self.sched = diffusion.make_schedule(d.schedule, int(d.num_timesteps))
    self._real_feats = None
    self._feature_net = None

  @functools.cached_property
  def vae(self) -> common.LoadedVAE:
    return common.load_vae(self.config.vae_from)

  @functools.cached_property
  def unet(self):
    return common.latent_unet(self.config, self.vae.latent_channels)

  @functools.cached_property
  def tx(self):
    return optim.make_optimizer(self.config.optim, int(self.config.train.num_steps))[0]

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
    mean, logvar = self.vae.encode_source(images, self.transforms(False),
                                          batch_size=int(self.config.train.eval_batch_size))
    src = arrays.ArraySource({"mean": mean, "logvar": logvar}, info)
    if jax.process_index() == 0:
      src.save(cache)
    return src

  def transforms(self, train: bool) -> list:
    # Train records are cached latents (no transforms); images (the latent cache's input
    # and the FD reference) get the deterministic eval transforms.
    return [] if train else super().transforms(False)

  # ---- state
  def init_state(self, rng, batch):
    z = batch["mean"]
    params = self.unet.init(rng, z, jnp.zeros((z.shape[0],), jnp.int32))["params"]
    # Latent normalization, fixed from the first batch: LDM's scale factor 1/std, plus a
    # per-channel shift (KL-VAE latents are not zero-mean; a shift keeps the diffusion
    # target centred, which an undertrained UNet otherwise turns into sampling drift).
    sample = batch["mean"] + jnp.exp(0.5 * batch["logvar"]) * jax.random.normal(
        rng, z.shape)
    shift = jnp.mean(sample, axis=(0, 1, 2)) if self.config.latent_shift else jnp.zeros(
        z.shape[-1])
    scale = 1.0 / jnp.maximum(jnp.std(sample - shift), 1e-6)
    return TrainState.create(params=params, tx=self.tx, apply_fn=self.unet.apply,
                             extras={"ema": params, "scale_factor": scale,
                                     "latent_shift": shift})

  def train_step(self, state, batch, rng):
    k_z, k_diff = jax.random.split(rng)
    eps = jax.random.normal(k_z, batch["mean"].shape)
    z = batch["mean"] + jnp.exp(0.5 * batch["logvar"]) * eps
    z0 = (z - state.extras["latent_shift"]) * state.extras["scale_factor"]
    d = self.config.diffusion

    def loss_fn(params):
      model_fn = lambda x, t, c: self.unet.apply({"params": params}, x, t)
      out = diffusion.training_losses(self.sched, model_fn, z0, k_diff,
                                      parameterization=d.parameterization)
      return jnp.mean(out["loss"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads)
    ema = optax.incremental_update(state.params, state.extras["ema"],
                                   step_size=1.0 - float(self.config.ema_decay))
    state = state.replace(extras={**state.extras, "ema": ema})
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  # ---- eval: sample, decode, FD/KID against held-out real images
  def sample_images(self, state, num: int, seed: int, num_steps: int) -> np.ndarray:
    return common.sample_images(self.unet, self.sched, self.vae, state.extras["ema"],
                                state.extras["scale_factor"], state.extras["latent_shift"],
                                self.config, num=num,
                                seed=seed, num_steps=num_steps, mesh=self.mesh)

  def _real(self, num: int) -> np.ndarray:
    src = super().make_source(self.config.train.eval_split)
    return loader.collect(src, self.transforms(False), limit=num)["image"]

  def evaluate_state(self, state, ctx):
    e = self.config.eval
    if self._feature_net is None:
      path = e.feature_net_path or self.config.vae_from
      self._feature_net = feature_nets.make_feature_net(e.feature_net, path)
      self._real_feats = self._feature_net(self._real(int(e.num_samples)))
    fake = self.sample_images(state, int(e.num_samples), seed=int(self.config.seed) + 1,
                              num_steps=int(e.ddim_steps))
    metrics = generative.generative_metrics(self._real_feats, self._feature_net(fake),
                                            label=self._feature_net.label,
                                            num_boot=int(e.num_boot))
    label = metrics.pop("feature_net")
    out_dir = pathlib.Path(ctx.workdir) / "samples"
    out_dir.mkdir(exist_ok=True)
    path = fig_lib.image_grid(fake[:16], out_dir / f"step_{ctx.step:07d}.png", nrow=8)
    figs = {f"samples at step {ctx.step} (FD {metrics['fd']:.3g} in {label})":
            os.path.relpath(path, ctx.workdir)} if ctx.final else {}
    return metrics, figs

  def report_lines(self, workdir):
    return ["## Frechet distance over training", "",
            f"Feature network: {self._feature_net.label if self._feature_net else 'n/a'}. "
            f"FD and KID are computed on {self.config.eval.num_samples} DDIM-"
            f"{self.config.eval.ddim_steps} samples (EMA weights) against as many held-out "
            f"real images; `fd_lo`/`fd_hi` are 95% bootstrap bounds (see metrics.jsonl)."]
