"""Deep-supervision loss of the UNet++ heads (LTDiff++ Sec. III-A3; Zhou et al. 2018).

LTDiff++ prints, for heads Y^_j on X_{0,j},

  L = sum_j w_j * ( -(1/N) sum_b [ 1/2 Y_b log Y^_{j,b} + 2 Y_b Y^_{j,b} / (Y_b + Y^_{j,b}) ] )

which is UNet++'s mask loss (1/2 BCE + Dice, batch size N) copied verbatim; LTDiff++
reconstructs CT slices, where it does not apply. ``kind`` picks the per-head term:

  "l1", "l2"   per-example mean |Y^ - Y| or (Y^ - Y)^2 (``losses.vae.reconstruction_loss``):
               the reading for CT reconstruction (DESIGN, ``shared/specs/ltdiff.md``).
  "bce_dice"   the printed loss on mask logits: 1/2 BCE + soft Dice loss
               (``losses.segmentation``: BCE for one channel, softmax CE for K > 1; Dice
               with smooth 1), i.e. the printed term up to the constant 1 of "1 - Dice".

The paper does not state w_j; the default is equal weights 1/n (the mean over heads), so
the scale does not change with the number of heads.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from medrep_jax.losses import segmentation as seg_losses
from medrep_jax.losses import vae as vae_losses

KINDS = ("l1", "l2", "bce_dice")


def head_loss(head: jax.Array, target: jax.Array, kind: str = "l1",
              example_weights: jax.Array | None = None) -> jax.Array:
  """One head's term (module docstring), a scalar mean over the batch; ``example_weights``
  (B,) gives the weighted mean (weight-0 padding examples count for nothing)."""
  if kind in ("l1", "l2"):
    per_example = vae_losses.reconstruction_loss(target, head, kind=kind, reduction="mean")
    return seg_losses.reduce_batch(per_example, example_weights)
  if kind == "bce_dice":
    return (0.5 * seg_losses.cross_entropy_loss(head, target, example_weights)
            + seg_losses.dice_loss(head, target, example_weights))
  raise ValueError(f"deep-supervision loss kind must be one of {KINDS}, got {kind!r}")


def deep_supervision_loss(heads: jax.Array | Sequence[jax.Array], target: jax.Array,
                          weights: Sequence[float] | None = None, kind: str = "l1", *,
                          example_weights: jax.Array | None = None,
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = sum_j w_j * loss(head_j, target) over the UNet++ heads (LTDiff++ Sec. III-A3).

  Args:
    heads: the heads ``UNetPlusPlus`` returns (a list, or one array), each shaped like
      ``target`` ("l1"/"l2") or logits (B, H, W, K) for ``target``'s mask ("bce_dice").
    target: the image (B, H, W, C), or the mask (B, H, W) / (B, H, W, 1) / labels.
    weights: w_j, one per head; None gives 1/n each.
    kind: "l1", "l2" or "bce_dice".
    example_weights: optional (B,) per-example weights.

  Returns:
    (L float32, {"loss_head1": ..., "loss_headn": ...} unweighted per-head terms).
  """
  heads = [heads] if isinstance(heads, jax.Array) else list(heads)
  if not heads:
    raise ValueError("deep_supervision_loss needs at least one head")
  if weights is None:
    weights = [1.0 / len(heads)] * len(heads)
  if len(weights) != len(heads):
    raise ValueError(f"got {len(weights)} weights for {len(heads)} heads")
  terms = {f"loss_head{j}": head_loss(h, target, kind, example_weights)
           for j, h in enumerate(heads, 1)}
  total = sum(w * t for w, t in zip(weights, terms.values()))
  return jnp.asarray(total, jnp.float32), terms
