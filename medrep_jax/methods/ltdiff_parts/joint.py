"""LTDiff++ stage `joint` (phase 3, Sec. III-C): the denoiser and the decoder fine-tuned together.

The paper's phase 3 integrates the trained UNet++ and latent DDPM with

  L = ||Z_A' - Z_B||² + λ ||D(Z_A') - B||²                            (Sec. III-C)

where Z_A' is the translated latent. Sampling the whole reverse chain inside the loss is
not differentiable at any useful cost, so Z_A' here is the denoiser's one-step estimate of
the clean latent from the translation's own starting point (the reading of DESIGN.md's
SDEdit start): for t ~ U{0, ..., t* - 1} and ε ~ N(0, I),

  z_t   = q_sample(Z_A', t, ε)                       Z_A' = normalized E(A), as `translate`
  Z_A'  = x̂_0(z_t, t) = (z_t - sqrt(1 - ᾱ_t) ε_θ(z_t, t, concat=Z_A)) / sqrt(ᾱ_t)
  L     = mean (Z_A' - Z_B)² + λ mean (D(Z_A', skips_A) - B)²

(Z_B normalized as the latent_ddpm run normalizes it; D the deepest head, as an image
in [0, 1]). Trained: the denoiser (from the latent_ddpm run's EMA weights) and the UNet++
decoder (nodes X_(i,j>0), heads, the latent-to-bottleneck conv, `gen` of skip_mode
"none"); frozen: the encoder and its latent conv (so Z_A and Z_B keep their meaning) and
every BatchNorm statistic (the UNet++ runs in inference mode). λ is `joint.lam` (not
stated in the paper). The EMA of every parameter is kept in extras["ema"] (`ema_decay`).

`translate` accepts a joint run as `ddpm_from`: it samples with the joint EMA denoiser and
decodes with the joint EMA decoder. Evaluation, on `train.eval_split`, at t = t* - 1 with a
per-example fixed ε: `latent_mse` (||Z_A' - Z_B||²), `image_l1` (|D(Z_A') - B| in [0, 1]),
`mae_hu` and, as the reference, `image_l1_a_b` (|A - B|).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax import diffusion, methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.core import optim
from medrep_jax.diffusion import gaussian
from medrep_jax.methods import base
from medrep_jax.methods.ltdiff_parts import common
from medrep_jax.methods.ltdiff_parts import data as data_lib
from medrep_jax.methods.ltdiff_parts import latent_ddpm, translate

FROZEN = ("encoder", "to_latent")  # UNet++ parameters that stay as the ae trained them
EVAL_SEED = 4321


class JointModel(nn.Module):
  """The latent DDPM's denoiser and the ae's UNet++ as one parameter tree."""
  denoiser: nn.Module
  unetpp: nn.Module

  def __call__(self, z, t, cond, image):
    return self.denoiser(z, t, concat=cond), self.unetpp(image, train=False)


def trainable_labels(params) -> dict:
  """"train" / "freeze" per leaf: the denoiser and the decoder train; `FROZEN` does not."""
  def label(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    return "freeze" if keys[0] == "unetpp" and keys[1] in FROZEN else "train"
  return jax.tree_util.tree_map_with_path(label, params)


class JointStage(base.EMAParams, base.Method):
  """Fine-tunes ε_θ and D on ||Z_A' - Z_B||² + λ||D(Z_A') - B||² (phase 3)."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    if float(config.joint.lam) < 0:
      raise ConfigError(f"joint.lam must be >= 0, got {config.joint.lam}")
    data_lib.window(config.data)

  @functools.cached_property
  def ddpm(self) -> methods.Trained:
    if not self.config.ddpm_from:
      raise ConfigError("ddpm_from is empty: point it at a finished `ltdiff` stage="
                        "latent_ddpm run (in the pipeline: 'stage:latent_ddpm')")
    trained = methods.load_trained(self.config.ddpm_from, method="ltdiff",
                                   stage="latent_ddpm")
    if latent_ddpm.check_space(trained.config) != "latent":
      raise ConfigError(f"ddpm_from={self.config.ddpm_from!r} is a pixel-space DDPM; the "
                        f"joint stage fine-tunes a latent DDPM and its decoder")
    return trained

  @functools.cached_property
  def ae(self) -> latent_ddpm.LoadedAE:
    ae = latent_ddpm.load_ae(self.config.ae_from or self.ddpm.config.ae_from)
    ae.check_data(self.config.data)
    return ae

  @functools.cached_property
  def sched(self):
    d = self.ddpm.config.diffusion
    with jax.ensure_compile_time_eval():  # concrete even when first read under jit
      return diffusion.make_schedule(str(d.schedule), int(d.num_timesteps))

  @functools.cached_property
  def t_star(self) -> int:
    return translate.check_t_star(self.config.joint.t_star, self.sched.num_timesteps)

  @functools.cached_property
  def model(self) -> JointModel:
    return JointModel(denoiser=self.ddpm.model, unetpp=self.ae.model)

  @functools.cached_property
  def tx(self) -> optax.GradientTransformation:
    base_tx = optim.make_optimizer(self.config.optim, int(self.config.train.num_steps))[0]
    return optax.multi_transform({"train": base_tx, "freeze": optax.set_to_zero()},
                                 trainable_labels)

  # ---- data: the split's (A, B) pairs as they are
  def make_source(self, split: str):
    return data_lib.pair_source(self.config.data, split,
                                progress=bool(self.config.train.progress))

  def transforms(self, split: str) -> list:
    del split  # the pair source already resizes, windows and scales
    return []

  # ---- state: the two finished runs' weights
  def init_variables(self, rng, batch):
    del rng, batch
    ae_vars = self.ae.variables
    return {"params": {"denoiser": self.ddpm.run.extras["ema"], "unetpp": ae_vars["params"]},
            "batch_stats": {"unetpp": ae_vars.get("batch_stats", {})}}

  def init_extras(self, rng, batch, params, model_state):
    del rng, batch, model_state
    norm = {k: jnp.asarray(self.ddpm.run.extras[k]) for k in ("latent_shift", "scale_factor")}
    return {"ema": params, **norm}

  # ---- the loss
  def _translate_once(self, params, model_state, extras, a, t, noise):
    """(normalized Z_A' = x̂_0 from z_t = q_sample(Z_A, t), D(Z_A') in [0, 1])."""
    m, unet_vars = self.model, {"params": params["unetpp"],
                                "batch_stats": model_state["batch_stats"]["unetpp"]}
    z_a, skips = m.unetpp.apply(unet_vars, a, train=False, method="encode")
    z_a = latent_ddpm.normalize(jax.lax.stop_gradient(z_a), extras)
    skips = jax.lax.stop_gradient(skips)
    z_t = gaussian.q_sample(self.sched, z_a, t, noise)
    eps = m.denoiser.apply({"params": params["denoiser"]}, z_t,
                           self.sched.timestep_map[t], concat=z_a)
    z_prime = gaussian.predict_x0_from_eps(self.sched, z_t, t, eps)
    heads = m.unetpp.apply(unet_vars, latent_ddpm.denormalize(z_prime, extras), skips,
                           train=False, method="decode")
    return z_prime, common.to_image(self.ae.config, common.deepest(heads))

  def _z_b(self, params, model_state, extras, b):
    unet_vars = {"params": params["unetpp"],
                 "batch_stats": model_state["batch_stats"]["unetpp"]}
    z_b, _ = self.model.unetpp.apply(unet_vars, b, train=False, method="encode")
    return latent_ddpm.normalize(jax.lax.stop_gradient(z_b), extras)

  def loss_fn(self, params, state, batch, rng):
    a, b = batch["image_a"], batch["image_b"]
    k_t, k_eps = jax.random.split(rng)
    t = jax.random.randint(k_t, (a.shape[0],), 0, self.t_star)
    z_b = self._z_b(params, state.model_state, state.extras, b)
    noise = jax.random.normal(k_eps, z_b.shape, z_b.dtype)
    z_prime, a_prime = self._translate_once(params, state.model_state, state.extras, a, t,
                                            noise)
    latent = jnp.mean((z_prime - z_b) ** 2)
    image = jnp.mean((a_prime - b) ** 2)
    loss = latent + float(self.config.joint.lam) * image
    return loss, {"metrics": {"latent_mse": latent, "image_mse": image}}

  # ---- eval at t = t* - 1
  def eval_step(self, state, batch):
    a, b = batch["image_a"], batch["image_b"]
    params = state.extras["ema"]
    z_b = self._z_b(params, state.model_state, state.extras, b)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_SEED), i))(
        batch["index"].astype(jnp.uint32))
    noise = jax.vmap(lambda k: jax.random.normal(k, z_b.shape[1:]))(keys)
    t = jnp.full((a.shape[0],), self.t_star - 1, jnp.int32)
    z_prime, a_prime = self._translate_once(params, state.model_state, state.extras, a, t,
                                            noise)
    per = lambda x: jnp.mean(x, axis=tuple(range(1, x.ndim)))
    return {"latent_mse": per((z_prime - z_b) ** 2), "image_l1": per(jnp.abs(a_prime - b)),
            "image_l1_a_b": per(jnp.abs(a - b))}

  def evaluate(self, outputs, state, ctx):
    _, width = data_lib.window(self.config.data)
    metrics = {k: float(np.mean(v)) for k, v in outputs.items()}
    metrics["mae_hu"] = metrics["image_l1"] * width
    if not ctx.final:
      return base.Result(metrics)
    return base.Result(metrics, {}, [
        f"Phase 3: the denoiser of `{self.ddpm.run.path}` and the decoder of "
        f"`{self.ae.run_dir}` fine-tuned on ||Z_A' - Z_B||² + {self.config.joint.lam:g} "
        f"||D(Z_A') - B||², Z_A' the one-step x̂_0 from Z_A noised to t < t* = "
        f"{self.t_star}. Metrics (EMA weights, {ctx.split} split) at t = t*: "
        f"`latent_mse`, `image_l1` (A' vs B) against `image_l1_a_b` (A vs B). Translate "
        f"with `stage=translate --config.ddpm_from={self.workdir}`."])
