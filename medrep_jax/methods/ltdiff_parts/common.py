"""Pieces the LTDiff++ stages share: the UNet++ from `config.model` and its checks.

`build_unetpp(config)` is the encoder-decoder of every stage (the `ae` stage trains it;
later stages rebuild it from the `ae` run's saved config to encode Z_A / Z_B and decode).
`check_model` fails early, at stage construction, with the config key that is wrong.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medrep_jax.config_lib import ConfigError
from medrep_jax.losses import unetpp as unetpp_losses
from medrep_jax.models import unetpp

CHANNELS = 1  # a CT slice; heads reconstruct it
LOSS_KINDS = ("l1", "l2")  # per head; "bce_dice" (the printed mask loss) behind a switch


def check_model(config) -> None:
  """Config errors of the UNet++ and its input size, named by key."""
  m = config.model
  widths = tuple(int(w) for w in m.widths)
  if len(widths) < 2 or min(widths) < 1:
    raise ConfigError(f"model.widths must list >= 2 positive widths (shallow to deep), "
                      f"got {tuple(m.widths)}")
  for key, allowed in (("skip_mode", unetpp.SKIP_MODES), ("upsample", unetpp.UPSAMPLES)):
    if m[key] not in allowed:
      raise ConfigError(f"model.{key}={m[key]!r}; expected one of {allowed}")
  if int(m.latent_channels) < 0:
    raise ConfigError(f"model.latent_channels must be >= 0 (0: the bottleneck X_(d-1,0) "
                      f"itself), got {m.latent_channels}")
  size, f = int(config.data.image_size), 2 ** (len(widths) - 1)
  if size < f or size % f:
    raise ConfigError(f"data.image_size={size} must be a multiple of 2^(depth-1) = {f} "
                      f"for model.widths={widths}")
  if bool(config.get("remat", False)):
    raise ConfigError("remat=True: UNetPlusPlus has no activation checkpointing; set "
                      "remat=False")


def num_heads(config) -> int:
  """Heads on X_(0,1..d-1) with deep supervision, else the one on X_(0,d-1)."""
  return len(config.model.widths) - 1 if bool(config.model.deep_supervision) else 1


def head_weights(config) -> tuple[float, ...] | None:
  """`loss.head_weights` checked against the heads (None: equal weights 1/n)."""
  kind = config.loss.kind
  if kind not in LOSS_KINDS and not (kind == "bce_dice" and printed_loss(config)):
    hint = (" (bce_dice is UNet++'s mask loss, printed in Sec. III-A3; slices are "
            "reconstructed with l1 or l2; set loss.allow_bce_dice=True to train with it "
            "anyway)" if kind in unetpp_losses.KINDS else "")
    raise ConfigError(f"loss.kind={kind!r}; expected one of {LOSS_KINDS}{hint}")
  weights = tuple(float(w) for w in config.loss.head_weights)
  if not weights:
    return None
  n = num_heads(config)
  if len(weights) != n or min(weights) < 0 or not sum(weights) > 0:
    raise ConfigError(f"loss.head_weights={weights}: need {n} non-negative weights, not all "
                      f"0, one per head X_(0,1..{n}) (or () for 1/{n} each)")
  return weights


def printed_loss(config) -> bool:
  """The printed BCE + Dice is switched on: heads are logits, images their sigmoid."""
  return config.loss.kind == "bce_dice" and bool(config.loss.get("allow_bce_dice", False))


def to_image(config, head):
  """A head's output as an image in [0, 1]: clipped, or sigmoid(logits) for bce_dice."""
  return jax.nn.sigmoid(head) if printed_loss(config) else jnp.clip(head, 0.0, 1.0)


def build_unetpp(config) -> unetpp.UNetPlusPlus:
  """The UNet++ of `config.model`, computing in `config.dtype` (bf16: mixed precision)."""
  m = config.model
  return unetpp.UNetPlusPlus(
      out_channels=CHANNELS, widths=tuple(int(w) for w in m.widths), norm=str(m.norm),
      deep_supervision=bool(m.deep_supervision), latent_channels=int(m.latent_channels),
      skip_mode=str(m.skip_mode), upsample=str(m.upsample), dtype=jnp.dtype(config.dtype))


def deepest(heads):
  """The head on X_(0,d-1) (the full network's output) from `UNetPlusPlus`'s heads."""
  return heads[-1] if isinstance(heads, (list, tuple)) else heads
