"""Pieces the LDM stages share: a loaded VAE, the latent UNet, batched sharded sampling."""
from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from medrep_jax import diffusion
from medrep_jax.data import loader
from medrep_jax.models import diffusion_unet, vae
from medrep_jax import methods
from medrep_jax.core import mesh as mesh_lib


def _overrides(model_cfg) -> dict:
  out = {}
  for key in ("base_width", "num_res_blocks"):
    if int(model_cfg.get(key, 0) or 0) > 0:
      out[key] = int(model_cfg[key])
  return out


def build_vae(model_cfg, channels: int, dtype=jnp.float32) -> vae.AutoencoderKL:
  """`AutoencoderKL` from `model.size` plus the base_width / num_res_blocks overrides."""
  return vae.AutoencoderKL(in_channels=channels, dtype=dtype,
                           **{**vae.vae_config(model_cfg.size), **_overrides(model_cfg)})


class LoadedVAE:
  """A trained `AutoencoderKL` from an `ldm` stage-`vae` run, with jitted encode/decode."""

  def __init__(self, run_dir: str | pathlib.Path):
    if not run_dir:
      raise ValueError("vae_from is empty: point it at a finished `ldm` stage=vae run "
                       "(in the pipeline: 'stage:vae')")
    trained = methods.load_trained(run_dir, method="ldm", stage="vae")
    cfg = trained.config
    self.run_dir = trained.run.path
    self.channels = trained.stage.channels
    self.image_size = int(cfg.data.image_size)
    self.model = trained.model
    self.params = trained.run.params
    self.latent_channels = self.model.latent_channels
    self.latent_size = self.image_size // self.model.downsample_factor
    model = self.model

    def enc(p, x):
      post = model.apply({"params": p}, x * 2.0 - 1.0, method=model.encode)
      return post.mean, post.logvar

    def dec(p, z):
      x = model.apply({"params": p}, z, method=model.decode)
      return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

    self._enc, self._dec = jax.jit(enc), jax.jit(dec)

  def encode_source(self, source, transforms, batch_size: int = 64):
    """Posterior (mean, logvar) of every element of `source`, as float32 numpy arrays."""
    means, logvars = [], []
    n = len(source)
    batches = loader.eval_batches(source, transforms, global_batch=batch_size,
                                  process_index=0, process_count=1)
    for b in tqdm(batches, total=math.ceil(n / batch_size), desc="encoding latents",
                  disable=jax.process_index() != 0):
      m, lv = self._enc(self.params, jnp.asarray(b["image"]))
      keep = b["_valid"] > 0
      means.append(np.asarray(m)[keep])
      logvars.append(np.asarray(lv)[keep])
    return np.concatenate(means), np.concatenate(logvars)

  def decode(self, z: jax.Array) -> jax.Array:
    return self._dec(self.params, z)


_VAE_CACHE: dict[str, LoadedVAE] = {}


def load_vae(run_dir: str | pathlib.Path) -> LoadedVAE:
  key = str(pathlib.Path(run_dir).absolute()) if run_dir else ""
  if key not in _VAE_CACHE:
    _VAE_CACHE[key] = LoadedVAE(run_dir)
  return _VAE_CACHE[key]


def latent_unet(config, latent_channels: int) -> diffusion_unet.DiffusionUNet:
  return diffusion_unet.get_diffusion_unet(config.model.size, latent_channels,
                                           dtype=jnp.dtype(config.dtype),
                                           remat=bool(config.get("remat", False)),
                                           **_overrides(config.model))


def sample_images(unet, sched, loaded_vae: LoadedVAE, params, scale_factor, latent_shift,
                  sample_cfg, parameterization: str, *, num: int, seed: int, num_steps: int,
                  sampler: str = "ddim", mesh, progress: bool = False) -> np.ndarray:
  """`num` decoded samples in [0, 1] (N, H, W, C), sampled in batches sharded on "data".

  Latents are un-normalized as z = x / scale_factor + latent_shift before decoding.

  One compilation serves every batch: the batch size is fixed (`sample_cfg.batch_size`)
  and the last batch is padded. `sample_cfg` also gives `eta` (DDIM) and `clip_x0`.
  """
  n_dev = mesh.shape[mesh_lib.DATA]
  batch = int(sample_cfg.batch_size)
  batch = max(n_dev, (batch // n_dev) * n_dev)
  s = loaded_vae.latent_size
  shape = (batch, s, s, loaded_vae.latent_channels)
  sharding = NamedSharding(mesh, P(mesh_lib.DATA))
  kwargs = dict(parameterization=parameterization, sharding=sharding)
  if sampler == "ddim":
    kwargs.update(num_steps=num_steps, eta=float(sample_cfg.eta))
  clip = float(sample_cfg.get("clip_x0", 0.0))
  if clip > 0:  # clip x0_hat of the normalized latents (unit variance) at every step
    kwargs["clip_x0"] = clip
  sample = diffusion.make_sampler(lambda p, x, t, c: unet.apply({"params": p}, x, t),
                                  sched, shape, sampler=sampler, **kwargs)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  out = []
  rng = jax.random.key(seed)
  for i in tqdm(range(math.ceil(num / batch)), desc=f"sampling ({sampler})",
                disable=not progress or jax.process_index() != 0):
    z = sample(params, jax.random.fold_in(rng, i)) / scale_factor + latent_shift
    out.append(np.asarray(mesh_lib.to_host(loaded_vae.decode(z))))
  return np.concatenate(out)[:num]
