"""LDM stage `vae`: the KL-regularized autoencoder (dual-stream paper, Stage 1, eq. 1).

Loss: L1 (or L2) reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I)), plus an optional
PatchGAN hinge loss switched on after `disc_start` steps. Images are scaled to [-1, 1].
The discriminator's parameters and optimizer state are explicit fields of
`state.extras`, so they are checkpointed and sharded like everything else.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as eval_metrics
from medrep_jax.losses import vae as vae_losses
from medrep_jax.methods import base
from medrep_jax.methods.ldm_parts import common
from medrep_jax.models import vae
from medrep_jax.core import optim


class VAEStage(base.Method):
  """Trains `AutoencoderKL` (+ `PatchDiscriminator` when `model.disc_weight > 0`)."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    m = config.model
    self.use_disc = float(m.disc_weight) > 0
    self.disc = vae.PatchDiscriminator(base_width=int(m.disc_width)) if self.use_disc else None

  @functools.cached_property
  def model(self) -> vae.AutoencoderKL:
    return common.build_vae(self.config.model, self.channels,
                            jnp.dtype(self.config.dtype))

  @functools.cached_property
  def disc_tx(self):
    return optim.make_optimizer(self.config.optim, int(self.config.train.num_steps))[0]

  def init_variables(self, rng, batch):
    return self.model.init(jax.random.split(rng)[0], batch["image"] * 2.0 - 1.0)

  def init_extras(self, rng, batch, params, model_state):
    """The discriminator's parameters and optimizer state, when the GAN term is on."""
    if not self.use_disc:
      return {}
    disc_params = self.disc.init(jax.random.split(rng)[1], batch["image"] * 2.0 - 1.0)["params"]
    return {"disc_params": disc_params, "disc_opt_state": self.disc_tx.init(disc_params)}

  def train_step(self, state, batch, rng):
    m = self.config.model
    x = batch["image"] * 2.0 - 1.0
    gan_w = (vae_losses.adopt_weight(state.step, int(m.disc_start), float(m.disc_weight))
             if self.use_disc else 0.0)

    def loss_fn(params):
      x_rec, posterior = self.model.apply({"params": params}, x, rng)
      loss, metrics = vae_losses.vae_loss(x, x_rec, posterior, kl_weight=float(m.kl_weight),
                                          rec=m.rec_loss)
      if self.use_disc:
        g = vae_losses.g_loss(self.disc.apply({"params": state.extras["disc_params"]}, x_rec))
        loss = loss + gan_w * g
        metrics = {**metrics, "g_loss": g}
      return loss, {"metrics": metrics, "x_rec": x_rec}

    new_state, metrics, aux = base.gradient_step(state, loss_fn)
    if not self.use_disc:
      return new_state, metrics
    extras = state.extras
    fake = jax.lax.stop_gradient(aux["x_rec"])

    def d_loss_fn(dp):
      return vae_losses.d_hinge_loss(self.disc.apply({"params": dp}, x),
                                     self.disc.apply({"params": dp}, fake))

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(extras["disc_params"])
    # The discriminator trains only once the GAN term is on (gan_w > 0).
    d_grads = jax.tree.map(lambda g: g * (gan_w > 0), d_grads)
    updates, d_opt = self.disc_tx.update(d_grads, extras["disc_opt_state"],
                                         extras["disc_params"])
    extras = {"disc_params": optax.apply_updates(extras["disc_params"], updates),
              "disc_opt_state": d_opt}
    return new_state.replace(extras=extras), {**metrics, "d_loss": d_loss}

  def eval_step(self, state, batch):
    x = batch["image"]
    x_rec, _ = self.model.apply({"params": state.params}, x * 2.0 - 1.0,
                                sample_posterior=False)
    x_rec = jnp.clip((x_rec + 1.0) / 2.0, 0.0, 1.0)
    return {"psnr": eval_metrics.psnr(x, x_rec),
            "l1": jnp.mean(jnp.abs(x - x_rec), axis=(1, 2, 3)),
            "index": batch["index"]}

  def evaluate(self, outputs, state, ctx):
    metrics = {"psnr": float(np.mean(outputs["psnr"])), "l1": float(np.mean(outputs["l1"]))}
    figs = {}
    if ctx.final:
      figs["reconstructions"] = self._figure(outputs["index"][:8], state, ctx)
    return base.Result(metrics, figs)

  def _figure(self, indices, state, ctx) -> str:
    from medrep_jax.data import transforms  # pylint: disable=g-import-not-at-top
    source, tfs = self.make_source(ctx.split), self.transforms(ctx.split)
    x = np.stack([transforms.apply_transforms(source[int(i)], tfs)["image"]
                  for i in indices])
    x_rec, _ = jax.jit(lambda p, v: self.model.apply({"params": p}, v,
                                                     sample_posterior=False))(
                                                         state.params, x * 2.0 - 1.0)
    rec = np.clip((np.asarray(x_rec) + 1.0) / 2.0, 0.0, 1.0)
    path = fig_lib.image_grid(np.concatenate([x, rec]),
                              ctx.figures_dir / "reconstructions.png", nrow=len(x),
                              titles=["input"] * len(x) + ["reconstruction"] * len(x))
    return os.path.relpath(path, ctx.workdir)
