"""DRFL losses (Xu et al., EAAI 2023, Sec. 3.4, eq. 1-7).

  L_seg    = L_bce(p_bin) + L_dice(p_bin)                      (eq. 1-3)
  L_sr     = mean |p_sr - g_sr|                                 (eq. 4)
  L_DFM    = L_sr + L_seg                                       (eq. 5)
  L_Fusion = L_bce(p_fusion) + L_dice(p_fusion)                 (eq. 6)
  L        = λ·L_DFM + γ·L_Fusion,  λ = γ = 1                   (eq. 7)

The segmentation terms reuse `losses.segmentation.dice_ce_loss` (BCE for one output
channel, softmax CE for K > 1) and the L1 term `losses.vae.reconstruction_loss`. Readings:
eq. 2 prints a sum over pixels with a typo ("(1 - g log(1-p))"); the project's BCE is the
pixel mean of -(g log p + (1-g) log(1-p)), which only rescales the term. Eq. 3's Dice uses
plain (not squared, as in the authors' code) sums, with smooth 1. The authors' training
code weighs both segmentation terms by 10 (`L1 + 10·dice_bce(p_bin) + 10·dice_bce(p_fusion)`):
that is `seg_weight=10`; the paper's eq. 7 is `seg_weight=1`.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from medrep_jax.losses import segmentation as seg_losses
from medrep_jax.losses import vae as vae_losses


def seg_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """L_seg (eq. 1) = L_bce (eq. 2) + L_dice (eq. 3) on p_bin (or p_fusion, eq. 6)."""
  return seg_losses.dice_ce_loss(logits, mask)


def sr_loss(p_sr: jax.Array, target: jax.Array) -> jax.Array:
  """L_sr (eq. 4): the mean absolute error between p_sr and the SR target g_sr."""
  return jnp.mean(vae_losses.reconstruction_loss(target, p_sr, kind="l1", reduction="mean"))


def drfl_loss(outputs: Mapping[str, jax.Array], mask: jax.Array,
              sr_target: jax.Array | None = None, *, lam: float = 1.0, gamma: float = 1.0,
              seg_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L (eq. 7) = λ·(L_sr + w·L_seg) + γ·w·L_Fusion, w = `seg_weight` (1 in the paper).

  The terms present follow `outputs`: without "p_sr" (no SR stream) L_sr is left out, and
  without "p_fusion" (no Fusion Module) L_Fusion is.

  Args:
    outputs: "p_bin" logits (B, H, W, K), optional "p_sr" in [0, 1] (B, 2H, 2W, C) and
      "p_fusion" logits (B, H, W, K).
    mask: (B, H, W) ground truth ({0, 1} for K = 1, labels for K > 1).
    sr_target: g_sr (B, 2H, 2W, C); needed when "p_sr" is present.
    lam, gamma: λ and γ of eq. 7.
    seg_weight: the weight of both segmentation terms (the authors' code: 10).

  Returns:
    (L, {"loss_seg", "loss_sr", "loss_fusion"} for the terms present, unweighted).
  """
  terms = {"loss_seg": seg_loss(outputs["p_bin"], mask)}
  dfm = seg_weight * terms["loss_seg"]
  if "p_sr" in outputs:
    if sr_target is None:
      raise ValueError("the SR stream is on (outputs hold p_sr) but no SR target was given")
    terms["loss_sr"] = sr_loss(outputs["p_sr"], sr_target)
    dfm = dfm + terms["loss_sr"]
  loss = lam * dfm
  if "p_fusion" in outputs:
    terms["loss_fusion"] = seg_loss(outputs["p_fusion"], mask)
    loss = loss + gamma * seg_weight * terms["loss_fusion"]
  return loss, terms
