"""The complementary guided attention loss of CAMContrast stage 1 (Yap & Ng, eq. 2-4).

  L = 1/B Σ_i [L_ce(x_i, y_i) + λ·L_attn(x_i, y_i)]                               (eq. 2)
  L_attn(x, y) = 𝟙(p⁰(x) ≥ 0.5, y = 0) / |M⁰(x)| · Σ_{i,j} (1 − M⁰_ij(x) + M¹_ij(x))  (eq. 4)

with λ = 0.01, p⁰ the predicted probability of the normal class (c = 0) and M⁰, M¹ the
min-max-normalized CAMs (eq. 1) of the normal and abnormal class (DESIGN.md). |M⁰| is the
number of CAM positions h·w (d·h·w for the 3-D CAMs of volumes, Sec. 4.7: the same loss
with the sum over all three axes). The loss only acts on normal images that are predicted
normal; it pushes M⁰ to cover the whole image and M¹ to vanish. The indicator is a
constant of the parameters (no gradient flows through it).

Multi-label extension (our reading; Sec. 4.6 only changes the heatmaps): with K sigmoid
outputs and no normal class, the loss acts on images with no positive label whose
probabilities are all below 0.5, and penalizes the mean of the K normalized CAMs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# CAMContrast Sec. 3.1: "λ is a weighting parameter which is set to 0.01 in all experiments".
ATTENTION_WEIGHT = 0.01


def _check(cams: jax.Array, probs: jax.Array, labels: jax.Array, multi: bool) -> None:
  if cams.ndim not in (4, 5):
    raise ValueError(f"cams must be (B, h, w, C) or (B, d, h, w, C) normalized CAMs, got "
                     f"shape {cams.shape}")
  b, c = cams.shape[0], cams.shape[-1]
  if probs.shape != (b, c):
    raise ValueError(f"probs must be (B={b}, C={c}) to match the CAMs, got {probs.shape}")
  want = (b, c) if multi else (b,)
  if labels.shape != want:
    raise ValueError(f"labels must have shape {want}, got {labels.shape}")
  if not multi and c != 2:
    raise ValueError(f"eq. 4 needs the CAMs of the normal and abnormal class (C = 2), got "
                     f"C = {c}; use attention_loss_multilabel for multi-label data")


def _spatial_axes(cams: jax.Array) -> tuple[int, ...]:
  """The CAM positions' axes: (1, 2) for (B, h, w, C), (1, 2, 3) for (B, d, h, w, C)."""
  return tuple(range(1, cams.ndim - 1))


def attention_indicator(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """𝟙(p⁰(x) ≥ 0.5, y = 0) of eq. 4: normal images predicted normal, (B,) float32.

  Args:
    probs: (B, 2) class probabilities (softmax of the logits).
    labels: (B,) integer labels, 0 = normal.
  """
  on = (probs[:, 0] >= 0.5) & (labels == 0)
  return jax.lax.stop_gradient(on.astype(jnp.float32))


def attention_loss(cams: jax.Array, probs: jax.Array, labels: jax.Array) -> jax.Array:
  """L_attn per example (eq. 4).

  Args:
    cams: (B, h, w, 2) min-max-normalized CAMs [M⁰, M¹] (`models.cam.minmax_normalize`),
      or (B, d, h, w, 2) 3-D CAMs of volumes.
    probs: (B, 2) class probabilities.
    labels: (B,) integer labels, 0 = normal, 1 = abnormal.

  Returns:
    (B,) float32 loss; 0 where the indicator is 0, else mean_ij(1 − M⁰_ij + M¹_ij).
  """
  _check(cams, probs, labels, multi=False)
  cams = cams.astype(jnp.float32)
  per_image = jnp.mean(1.0 - cams[..., 0] + cams[..., 1], axis=_spatial_axes(cams))
  return attention_indicator(probs, labels) * per_image


def attention_loss_multilabel(cams: jax.Array, probs: jax.Array,
                              labels: jax.Array) -> jax.Array:
  """Multi-label L_attn per example (our extension, see the module docstring).

  Args:
    cams: (B, h, w, K) (or (B, d, h, w, K)) min-max-normalized CAMs of the K disease classes.
    probs: (B, K) sigmoid probabilities.
    labels: (B, K) multi-hot labels; all zeros = normal.

  Returns:
    (B,) float32 loss: 𝟙(all p_k < 0.5, y = 0) · mean_{ij,k} M^k_ij.
  """
  _check(cams, probs, labels, multi=True)
  normal = jnp.all(labels == 0, axis=-1) & jnp.all(probs < 0.5, axis=-1)
  on = jax.lax.stop_gradient(normal.astype(jnp.float32))
  return on * jnp.mean(cams.astype(jnp.float32), axis=_spatial_axes(cams) + (cams.ndim - 1,))
