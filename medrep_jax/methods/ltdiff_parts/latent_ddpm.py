"""LTDiff++ stage `latent_ddpm` (phase 2, Sec. III-B/C): a conditional DDPM on UNet++ latents.

The `ae` run (`ae_from`: a finished `ltdiff` stage-`ae` workdir, `"stage:ae"` in the
pipeline) is frozen. Every (A, B) pair of a split is encoded once, Z_A = E(A), Z_B = E(B)
(the UNet++ latent, `models.unetpp.UNetPlusPlus.encode`, inference-mode BatchNorm), and
cached in WORKDIR/latents_<split>.npz (as the LDM caches its VAE latents).

Reading (DESIGN.md, shared/specs/ltdiff.md): the paper's reverse process conditions on
Z_B, which is unknown at test time; here an ε-prediction `DiffusionUNet` learns the noise
on Z_B conditioned on Z_A by channel concatenation (`concat_channels` = latent channels,
so its input has 2c channels: x_t = noised Z_B, then Z_A):

  L = E_{t, ε} || ε − ε_θ(q_sample(Z_B, t, ε), t, concat=Z_A) ||²

with the diffusion core's schedule and `training_losses` (L_simple). Latents are
normalized as z' = (z − shift) · scale, shift the per-channel mean and scale 1/std of the
first train batch's Z_A and Z_B (LDM's scale factor; `latent_norm=False`: shift 0,
scale 1), kept in `state.extras` with the EMA of the parameters (`ema_decay`, updated
in `train_step` after the gradient step, as the LDM's `unet` stage does; the platform has
no EMA of its own). The `translate` stage samples with the EMA weights.

Not stated in the paper, so choices here (configs/ltdiff.py): T, the β schedule, the
denoiser's widths, the EMA decay.

Evaluation, on `train.eval_split` (latents cached likewise): ε-MSE with the EMA weights
(`eps_mse`) and the raw weights (`eps_mse_raw`) at a per-example t and ε fixed by the
example's index (the same draws at every eval), and, as a scale reference, the mean
squared distance of the normalized Z_A and Z_B (`za_zb_mse`).
"""
from __future__ import annotations

import copy
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medrep_jax import diffusion, methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.data import arrays, loader
from medrep_jax.data.sources import SourceInfo
from medrep_jax.diffusion import gaussian
from medrep_jax.methods import base
from medrep_jax.methods.ltdiff_parts import common
from medrep_jax.methods.ltdiff_parts import data as data_lib
from medrep_jax.models import diffusion_unet

LATENT_KEYS = ("z_a", "z_b")
SPACES = ("latent", "pixel")
EVAL_SEED = 1234  # the fixed (t, ε) draws of the ε-MSE eval, folded with the example index


class Codec:
  """What the DDPM stages need of an encoder-decoder: `encode(variables, x) -> (z, skips)`,
  `decode(variables, z, skips) -> image in [0, 1]`, `variables`, the latent's size and
  channels, and `encode_pairs`."""

  run_dir: str
  skip_mode: str
  image_size: int
  latent_size: int
  latent_channels: int
  variables: dict

  def encode_pairs(self, pairs, batch_size: int, progress: bool = False):
    """(Z_A, Z_B) of every pair of `pairs` as float32 numpy arrays (N, h, w, c)."""
    out = {k: [] for k in LATENT_KEYS}
    batches = loader.eval_batches(pairs, [], global_batch=batch_size, process_index=0,
                                  process_count=1)
    for b in tqdm(batches, total=math.ceil(len(pairs) / batch_size), desc="encoding pairs",
                  disable=not progress or jax.process_index() != 0):
      keep = b["_valid"] > 0
      for key, image in zip(LATENT_KEYS, data_lib.PAIR_KEYS):
        z, _ = self.encode(self.variables, jnp.asarray(b[image], jnp.float32))
        out[key].append(np.asarray(z)[keep])
    return {k: np.concatenate(v) for k, v in out.items()}

  def with_variables(self, variables: dict) -> "Codec":
    """A copy that encodes and decodes with other weights (a joint run's decoder)."""
    other = copy.copy(self)
    other.variables = variables
    return other

  def check_data(self, data) -> None:
    """The data a later stage reads must be what the codec was built for (size, window)."""
    mine = (int(data.image_size), data_lib.window(data))
    theirs = (self.image_size, data_lib.window(self.data))
    if mine != theirs:
      raise ConfigError(f"data (image_size, HU window) {mine} differs from {theirs} of "
                        f"{self.run_dir}; set data.image_size / window_level / window_width "
                        f"as in that run")


class LoadedAE(Codec):
  """A finished `ltdiff` stage-`ae` run: jitted E(x) -> (latent, skips) and D(latent, skips).

  With the run's `model.skip_mode="source"` the decoder takes the encoder skips X_(i,0)
  of the input it decodes for (in `translate`: A's), so texture of A can reach A' past the
  latent; with "none" the skips are ignored and A' depends on the latent alone.
  """

  def __init__(self, run_dir):
    if not run_dir:
      raise ConfigError("ae_from is empty: point it at a finished `ltdiff` stage=ae run "
                        "(in the pipeline: 'stage:ae')")
    trained = methods.load_trained(run_dir, method="ltdiff", stage="ae")
    self.run_dir = trained.run.path
    self.config = trained.config
    self.data = trained.config.data
    self.model = trained.model
    self.variables = trained.variables
    self.skip_mode = str(self.config.model.skip_mode)
    self.image_size = int(self.config.data.image_size)
    shape = jax.eval_shape(
        lambda v, x: self.model.apply(v, x, train=False, method=self.model.encode)[0],
        self.variables, jax.ShapeDtypeStruct((1, self.image_size, self.image_size,
                                              common.CHANNELS), jnp.float32))
    self.latent_size, self.latent_channels = int(shape.shape[1]), int(shape.shape[-1])
    model = self.model
    self.encode = jax.jit(lambda v, x: model.apply(v, x, train=False, method=model.encode))
    config = self.config
    self.decode = jax.jit(lambda v, z, skips: common.to_image(config, common.deepest(
        model.apply(v, z, skips, train=False, method=model.decode))))


class PixelSpace(Codec):
  """The identity codec of the `pixel_ddpm` baseline (`space="pixel"`): the DDPM models
  the images themselves, Z_A = A and A' = clip(Z_A', 0, 1)."""

  run_dir = "(pixel space: no autoencoder)"
  skip_mode = "none"
  latent_channels = common.CHANNELS
  variables: dict = {}

  def __init__(self, data):
    self.data = data
    self.image_size = self.latent_size = int(data.image_size)
    self.encode = jax.jit(lambda v, x: (x.astype(jnp.float32), ()))
    self.decode = jax.jit(lambda v, z, skips: jnp.clip(z, 0.0, 1.0))


_AE_CACHE: dict[str, LoadedAE] = {}


def load_ae(run_dir) -> LoadedAE:
  key = str(pathlib.Path(run_dir).absolute()) if run_dir else ""
  if key not in _AE_CACHE:
    _AE_CACHE[key] = LoadedAE(run_dir)
  return _AE_CACHE[key]


def load_codec(config, ae_from: str = "") -> Codec:
  """The codec of a DDPM stage config: `PixelSpace` for `space="pixel"`, else the ae run
  `ae_from` (or the config's own `ae_from`)."""
  if check_space(config) == "pixel":
    return PixelSpace(config.data)
  return load_ae(ae_from or config.ae_from)


def check_space(config) -> str:
  space = str(config.get("space", "latent"))
  if space not in SPACES:
    raise ConfigError(f"space={space!r}; expected one of {SPACES} (latent: the UNet++ "
                      f"latents of ae_from; pixel: the pixel_ddpm baseline on the images)")
  return space


def build_denoiser(config, latent_channels: int) -> diffusion_unet.DiffusionUNet:
  """ε_θ(x_t, t, concat=Z_A): out = latent channels, input = latent + condition channels."""
  m = config.model
  overrides = {}
  if int(m.base_width) > 0:
    overrides["base_width"] = int(m.base_width)
  if tuple(m.channel_mult):
    overrides["channel_mult"] = tuple(int(x) for x in m.channel_mult)
  if int(m.num_res_blocks) > 0:
    overrides["num_res_blocks"] = int(m.num_res_blocks)
  if tuple(m.get("attention_resolutions", ())):
    overrides["attention_resolutions"] = tuple(int(x) for x in m.attention_resolutions)
  try:
    return diffusion_unet.get_diffusion_unet(
        str(m.size), int(latent_channels), concat_channels=int(latent_channels),
        dtype=jnp.dtype(config.dtype), remat=bool(config.get("remat", False)), **overrides)
  except ValueError as e:
    raise ConfigError(f"model.size: {e}") from e


def normalize(z, extras):
  return (z - extras["latent_shift"]) * extras["scale_factor"]


def denormalize(z, extras):
  return z / extras["scale_factor"] + extras["latent_shift"]


class LatentDDPMStage(base.EMAParams, base.Method):
  """Trains ε_θ(noised Z_B, t, concat Z_A) on cached latents of the frozen ae (phase 2)."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    d = config.diffusion
    if int(d.num_timesteps) < 1:
      raise ConfigError(f"diffusion.num_timesteps must be >= 1, got {d.num_timesteps}")
    if d.parameterization != "eps":
      raise ConfigError(f"diffusion.parameterization={d.parameterization!r}: the latent "
                        f"DDPM predicts the noise ('eps', Sec. III-B)")
    try:
      self.sched = diffusion.make_schedule(str(d.schedule), int(d.num_timesteps))
    except ValueError as e:
      raise ConfigError(f"diffusion.schedule: {e}") from e
    data_lib.window(config.data)
    check_space(config)

  @functools.cached_property
  def ae(self) -> Codec:
    ae = load_codec(self.config)
    ae.check_data(self.config.data)
    return ae

  @functools.cached_property
  def info(self) -> SourceInfo:
    if self.config.get("data_info"):
      return super().info  # a finished run: its model builds without the ae or the data
    return SourceInfo(name=f"{self.config.data.name}_latent_pairs", num_classes=0,
                      class_names=(), channels=self.ae.latent_channels,
                      image_dtype="float32")

  @functools.cached_property
  def model(self):
    return build_denoiser(self.config, int(self.info.channels))

  # ---- data: cached (Z_A, Z_B) of the split's pairs
  def make_source(self, split: str):
    cache = pathlib.Path(self.workdir) / f"latents_{split}.npz" if self.workdir else None
    if cache is not None and cache.exists():
      return arrays.ArraySource.load(cache, self.info)
    pairs = data_lib.pair_source(self.config.data, split,
                                 progress=bool(self.config.train.progress))
    latents = self.ae.encode_pairs(pairs, int(self.config.train.eval_batch_size),
                                   progress=bool(self.config.train.progress))
    src = arrays.ArraySource(latents, self.info)
    if cache is not None and jax.process_index() == 0:
      cache.parent.mkdir(parents=True, exist_ok=True)
      src.save(cache)
    return src

  def transforms(self, split: str) -> list:
    del split  # records are cached latents
    return []

  # ---- state
  def init_variables(self, rng, batch):
    z = batch["z_b"]
    return self.model.init(rng, z, jnp.zeros((z.shape[0],), jnp.int32), concat=batch["z_a"])

  def init_extras(self, rng, batch, params, model_state):
    """EMA weights and the latent normalization, fixed from the first batch."""
    del rng, model_state
    z = jnp.concatenate([batch["z_a"], batch["z_b"]])
    if bool(self.config.latent_norm):
      shift = jnp.mean(z, axis=(0, 1, 2))
      scale = 1.0 / jnp.maximum(jnp.std(z - shift), 1e-6)
    else:
      shift, scale = jnp.zeros(z.shape[-1]), jnp.ones(())
    return {"ema": params, "scale_factor": scale, "latent_shift": shift}

  def eps_fn(self, params):
    """model_fn(x_t, t, cond=Z_A') of the diffusion core: conditioning by concatenation."""
    return lambda x, t, cond: self.model.apply({"params": params}, x, t, concat=cond)

  def loss_fn(self, params, state, batch, rng):
    """L_simple on normalized Z_B, conditioned on normalized Z_A."""
    z_a, z_b = normalize(batch["z_a"], state.extras), normalize(batch["z_b"], state.extras)
    out = diffusion.training_losses(self.sched, self.eps_fn(params), z_b, rng,
                                    parameterization="eps", cond=z_a)
    return jnp.mean(out["loss"]), {}

  # ---- eval: ε-MSE on the eval split
  def eval_step(self, state, batch):
    extras = state.extras
    z_a, z_b = normalize(batch["z_a"], extras), normalize(batch["z_b"], extras)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_SEED), i))(
        batch["index"].astype(jnp.uint32))
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                              self.sched.num_timesteps))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1),
                                                 z_b.shape[1:]))(keys)
    xt = gaussian.q_sample(self.sched, z_b, t, noise)
    tt = self.sched.timestep_map[t]
    mse = lambda p: jnp.mean((self.eps_fn(p)(xt, tt, z_a) - noise) ** 2, axis=(1, 2, 3))
    return {"eps_mse": mse(extras["ema"]), "eps_mse_raw": mse(state.params),
            "za_zb_mse": jnp.mean((z_a - z_b) ** 2, axis=(1, 2, 3))}

  def evaluate(self, outputs, state, ctx):
    metrics = {k: float(np.mean(v)) for k, v in outputs.items()}
    if not ctx.final:
      return base.Result(metrics)
    d = self.config.diffusion
    return base.Result(metrics, {}, [
        f"ε-prediction DiffusionUNet on Z_B conditioned on Z_A (concatenation), "
        f"{d.schedule} schedule, T = {d.num_timesteps}, latents "
        f"{self.ae.latent_size}x{self.ae.latent_size}x{self.ae.latent_channels} from the "
        f"frozen ae run `{self.ae.run_dir}` (skip_mode {self.ae.skip_mode!r}). `eps_mse`: "
        f"EMA weights, `eps_mse_raw`: the trained weights, at per-example fixed (t, ε) on "
        f"the {ctx.split} split; `za_zb_mse`: ||Z_A - Z_B||² of the normalized latents."])
