"""Segmentation losses: BCE, softmax CE, soft Dice and soft IoU (Jaccard).

Shapes: ``logits`` are (B, H, W, K). With K == 1 the task is binary and
``mask`` is a {0, 1} (or soft) mask of shape (B, H, W) or (B, H, W, 1), and
probabilities are ``sigmoid(logits)``. With K > 1 the task is multi-class and
``mask`` holds integer labels (B, H, W) in [0, K); probabilities are
``softmax(logits)`` and targets their one-hot encoding.

Every loss is computed per example, then reduced to a scalar mean over the
batch; ``weights`` (B,) gives a weighted mean sum(w * l) / sum(w), so weight-0
examples (padding added to fill a global batch) contribute nothing. All math
is float32 whatever the logits dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _per_example_mean(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def reduce_batch(per_example: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean of a (B,) loss; with ``weights`` the weighted mean (0 if all weights are 0)."""
  if weights is None:
    return jnp.mean(per_example)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def _binary_target(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  mask = mask.astype(jnp.float32)
  if mask.ndim == logits.ndim - 1:
    mask = mask[..., None]
  if mask.shape != logits.shape:
    raise ValueError(f"binary mask shape {mask.shape} does not match logits {logits.shape}")
  return mask


def probs_and_targets(logits: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(probabilities, targets), both (B, H, W, K) float32 (see module docstring)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits), _binary_target(logits, mask)
  if mask.shape != logits.shape[:-1]:
    raise ValueError(f"multi-class mask must be integer labels of shape {logits.shape[:-1]}, "
                     f"got {mask.shape}")
  return jax.nn.softmax(logits, axis=-1), jax.nn.one_hot(mask, logits.shape[-1])


def bce_loss(logits: jnp.ndarray, mask: jnp.ndarray,
             weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Pixel-mean binary cross-entropy with logits (DCL-CsTP eq. 8 per pixel).

  ``mask`` has the logits' shape (multi-label) or lacks the trailing 1 (binary).
  """
  logits = logits.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, _binary_target(logits, mask))
  return reduce_batch(_per_example_mean(loss), weights)


def softmax_ce_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                    weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Pixel-mean softmax cross-entropy for integer label masks (B, H, W)."""
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32))
  return reduce_batch(_per_example_mean(loss), weights)


def cross_entropy_loss(logits: jnp.ndarray, mask: jnp.ndarray,
                       weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """BCE when K == 1, softmax CE when K > 1."""
  if logits.shape[-1] == 1:
    return bce_loss(logits, mask, weights)
  return softmax_ce_loss(logits, mask, weights)


def _overlaps(logits, mask):
  p, t = probs_and_targets(logits, mask)
  axes = tuple(range(1, p.ndim - 1))
  inter = jnp.sum(p * t, axis=axes)  # (B, K)
  return inter, jnp.sum(p, axis=axes), jnp.sum(t, axis=axes)


def dice_loss(logits: jnp.ndarray, mask: jnp.ndarray,
              weights: jnp.ndarray | None = None, smooth: float = 1.0,
              include_background: bool = True) -> jnp.ndarray:
  """Soft Dice loss, 1 - (2|P∩T| + s) / (|P| + |T| + s), averaged over classes.

  Computed per example and class with soft probabilities. An empty target
  with an empty prediction scores Dice 1 (loss 0) thanks to ``smooth``.
  ``include_background=False`` drops class 0 in the multi-class case.
  """
  inter, sp, st = _overlaps(logits, mask)
  dice = (2.0 * inter + smooth) / (sp + st + smooth)
  if not include_background and dice.shape[-1] > 1:
    dice = dice[:, 1:]
  return reduce_batch(1.0 - jnp.mean(dice, axis=-1), weights)


def iou_loss(logits: jnp.ndarray, mask: jnp.ndarray,
             weights: jnp.ndarray | None = None, smooth: float = 1.0,
             include_background: bool = True) -> jnp.ndarray:
  """Soft IoU (Jaccard) loss, L_IoU = 1 - |A∩B| / |A∪B| (DCL-CsTP eq. 9).

  |A∩B| = sum(p * t) and |A∪B| = sum(p) + sum(t) - sum(p * t) with soft
  probabilities p, plus ``smooth`` in numerator and denominator.
  """
  inter, sp, st = _overlaps(logits, mask)
  iou = (inter + smooth) / (sp + st - inter + smooth)
  if not include_background and iou.shape[-1] > 1:
    iou = iou[:, 1:]
  return reduce_batch(1.0 - jnp.mean(iou, axis=-1), weights)


def iou_bce_loss(logits: jnp.ndarray, mask: jnp.ndarray,
                 weights: jnp.ndarray | None = None, smooth: float = 1.0) -> jnp.ndarray:
  """DCL-CsTP segmentation loss, eq. 9: L = L_IoU + L_BCE.

  Binary (K == 1): soft IoU on sigmoid probabilities + BCE with logits.
  Multi-class (K > 1): soft IoU on softmax probabilities averaged over classes
  + softmax cross-entropy, the multi-class analogue of eq. 9.
  """
  return (iou_loss(logits, mask, weights, smooth)
          + cross_entropy_loss(logits, mask, weights))


def dice_ce_loss(logits: jnp.ndarray, mask: jnp.ndarray,
                 weights: jnp.ndarray | None = None, smooth: float = 1.0) -> jnp.ndarray:
  """Soft Dice + cross-entropy (BCE or softmax CE), a common alternative."""
  return (dice_loss(logits, mask, weights, smooth)
          + cross_entropy_loss(logits, mask, weights))
