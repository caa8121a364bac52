"""Losses of the KL autoencoder (LDM stage 1) and its optional PatchGAN.

The first stage of Rombach et al., "High-Resolution Image Synthesis with
Latent Diffusion Models", CVPR 2022 (Sec. 3.1, App. G), used by DCL-CsTP
(IEEE Access 2025, Sec. IV-A-1, "Stage 1"), minimizes

  L = sum_pixels |x - x_rec|  +  kl_weight * KL(q(z|x) || N(0, I))
      [+ disc_weight * adaptive_weight * L_G  once step >= disc_start]

per example, averaged over the batch, with kl_weight = 1e-6. The
reconstruction term is the negative log-likelihood of a Laplace (L1) or
Gaussian (L2) decoder (Kingma & Welling, ICLR 2014, eq. 3); it is summed
over pixels, as in the LDM code, so that ``kl_weight`` keeps the meaning it
has there (a per-pixel mean would make the KL term H*W*C times stronger).
An optional learned scalar output log-variance (LDM's ``logvar``) turns it
into the NLL ``rec / exp(logvar) + logvar`` per pixel.

Omitted: the LPIPS perceptual term of the LDM autoencoder. It needs
pretrained VGG-16 weights, which cannot be downloaded here; the loss is pure
L1/L2 + KL (+ GAN). The adversarial part (Esser et al., "Taming
Transformers", CVPR 2021, eq. 4-5; Isola et al. 2017 PatchGAN) is optional:
``d_hinge_loss``, ``g_loss``, ``adopt_weight`` (fixed ``disc_weight`` from
step ``disc_start``) and ``adaptive_gan_weight`` (Esser et al. eq. 7; the
caller supplies the two gradient norms w.r.t. the decoder's last layer).

All math is float32 whatever the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medrep_jax.models.vae import DiagonalGaussian

REC_KINDS = ("l1", "l2")


def _flat(x: jnp.ndarray) -> jnp.ndarray:
  return x.reshape(x.shape[0], -1)


def reconstruction_loss(x: jnp.ndarray, x_rec: jnp.ndarray, kind: str = "l1",
                        reduction: str = "mean") -> jnp.ndarray:
  """Per-example reconstruction error, shape (B,).

  Args:
    x: target images (B, ...).
    x_rec: reconstructions, same shape.
    kind: "l1" (|x - x_rec|) or "l2" ((x - x_rec)^2).
    reduction: "mean" or "sum" over the non-batch dims.
  """
  if x.shape != x_rec.shape:
    raise ValueError(f"x {x.shape} and x_rec {x_rec.shape} shapes differ")
  diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
  if kind == "l1":
    err = jnp.abs(diff)
  elif kind == "l2":
    err = jnp.square(diff)
  else:
    raise ValueError(f"reconstruction kind must be one of {REC_KINDS}, got {kind!r}")
  if reduction == "mean":
    return jnp.mean(_flat(err), axis=1)
  if reduction == "sum":
    return jnp.sum(_flat(err), axis=1)
  raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def kl_loss(posterior: DiagonalGaussian) -> jnp.ndarray:
  """KL(q(z|x) || N(0, I)) per example, summed over latent dims: shape (B,)."""
  return posterior.kl()


def vae_loss(x: jnp.ndarray, x_rec: jnp.ndarray, posterior: DiagonalGaussian, *,
             kl_weight: float = 1e-6, rec: str = "l1",
             logvar: jnp.ndarray | float | None = None
             ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """LDM autoencoder loss without the GAN term (see module docstring).

  Args:
    x, x_rec: images and reconstructions (B, H, W, C).
    posterior: q(z|x) from ``AutoencoderKL.encode``.
    kl_weight: weight of the summed KL (1e-6 in Rombach et al. 2022).
    rec: "l1" or "l2".
    logvar: optional learned scalar output log-variance (LDM's ``logvar``,
      a trainable parameter initialized to 0); None means no NLL scaling.

  Returns:
    (loss, metrics): loss is the batch mean of per-example
    ``nll_sum + kl_weight * kl``; metrics hold float32 scalars ``loss``,
    ``rec_loss`` (per-pixel mean error, comparable across image sizes),
    ``nll`` (per-example summed NLL), ``kl`` (per-example KL) and, with
    ``logvar``, ``logvar``.
  """
  rec_mean = reconstruction_loss(x, x_rec, rec, "mean")
  n_pix = x[0].size
  nll = rec_mean * n_pix
  if logvar is not None:
    logvar = jnp.asarray(logvar, jnp.float32)
    nll = nll / jnp.exp(logvar) + logvar * n_pix
  kl = kl_loss(posterior)
  loss = jnp.mean(nll + kl_weight * kl)
  metrics = {"loss": loss, "rec_loss": jnp.mean(rec_mean), "nll": jnp.mean(nll),
             "kl": jnp.mean(kl)}
  if logvar is not None:
    metrics["logvar"] = logvar
  return loss, metrics


def d_hinge_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
  """Hinge discriminator loss (Esser et al. 2021; Lim & Ye 2017), scalar.

  0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))).
  """
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def g_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
  """Generator (autoencoder) adversarial loss -mean(D(x_rec)), scalar."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adopt_weight(step: jnp.ndarray | int, disc_start: int,
                 weight: float = 1.0) -> jnp.ndarray:
  """``weight`` once ``step >= disc_start``, else 0 (jit-safe).

  The GAN term is switched on only after the autoencoder has warmed up
  (Esser et al. 2021; LDM's ``disc_start``).
  """
  return jnp.where(jnp.asarray(step) >= disc_start, jnp.float32(weight), jnp.float32(0.0))


def adaptive_gan_weight(rec_grads_norm: jnp.ndarray, g_grads_norm: jnp.ndarray, *,
                        eps: float = 1e-4, max_weight: float = 1e4) -> jnp.ndarray:
  """Adaptive GAN weight lambda = ||grad L_rec|| / (||grad L_G|| + eps) (Esser et al. eq. 7).

  Both norms are of gradients w.r.t. the decoder's last layer
  (``params["decoder"]["conv_out"]["kernel"]`` of ``AutoencoderKL``); compute
  them with ``jax.grad`` of each loss term with respect to that leaf. The
  result is clipped to [0, max_weight] and carries no gradient. Each norm
  costs an extra backward pass (down to that layer only); a fixed
  ``disc_weight`` via ``adopt_weight`` is the simpler alternative.
  """
  w = rec_grads_norm.astype(jnp.float32) / (g_grads_norm.astype(jnp.float32) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
