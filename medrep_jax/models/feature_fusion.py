"""Decoder-block layout of DiffusionUNet and fusion of external features into it.

DSDM's segmentation network (paper 004, Sec. IV-C2, Fig. 4) is the DSDM
denoising UNet with GroupNorm in place of SPADE; the features of chosen
decoder blocks of the frozen DSDM, run on a noisy image, enter the matching
decoder blocks of the segmentation net by cross-attention (CAA: queries from
the segmentation features, keys and values from the DSDM feature tokens, with
a residual); the ablation of Table 5 fuses them by a skip connection instead.

* ``decoder_blocks`` / ``decoder_block_names``: the ``dec_i`` names of a
  DiffusionUNet's up-path blocks (those of its ``return_features``) with their
  level, index and downsample factor. dec_i is 1-based, deepest first, taken
  before the level's upsampling; ADM/SDM's ``output_blocks[k]`` (0-based) is
  dec_{k+1}, except that ADM's last block of a level (but level 0) ends with
  the upsampling, so its output has twice dec_{k+1}'s resolution.
* ``check_fusion``: validation of the fusion attributes and features.
* ``fuse``: the fusion layer of one block, the identity when fresh.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax.numpy as jnp

from medrep_jax.models.attention import AttentionBlock
from medrep_jax.models.conditioning import conv
from medrep_jax.models.resnet import Dtype

FUSION_MODES = ("none", "skip", "caa")


class DecoderBlock(NamedTuple):
  """Up-path block ``dec_i``: ResBlock ``up_{level}_{index}`` at factor ``ds``."""
  level: int
  index: int
  ds: int


def decoder_blocks(channel_mult: Sequence[int],
                   num_res_blocks: int) -> dict[str, DecoderBlock]:
  """{"dec_i": DecoderBlock} of a DiffusionUNet, in up-path (call) order.

  Level l (deepest first) has ``num_res_blocks + 1`` blocks at ``ds = 2**l``.
  """
  levels = range(len(channel_mult) - 1, -1, -1)
  blocks = [DecoderBlock(l, i, 2 ** l) for l in levels
            for i in range(num_res_blocks + 1)]
  return {f"dec_{n}": b for n, b in enumerate(blocks, 1)}


def decoder_block_names(channel_mult: Sequence[int],
                        num_res_blocks: int) -> list[str]:
  """["dec_1", ..., "dec_N"], N = len(channel_mult) * (num_res_blocks + 1)."""
  return list(decoder_blocks(channel_mult, num_res_blocks))


def check_fusion(fusion: str, fusion_blocks: Sequence[str],
                 channel_mult: Sequence[int], num_res_blocks: int,
                 x_shape: Sequence[int],
                 fused: Mapping[str, jnp.ndarray] | None) -> None:
  """Validates a DiffusionUNet's fusion settings against its input x_shape.

  ``fused`` must hold, for each of ``fusion_blocks``, a (B, h, w, C_f)
  feature with the block's (B, h, w); other entries are ignored.

  Raises:
    ValueError: unknown ``fusion``; ``fused`` or ``fusion_blocks`` given with
      fusion "none"; an unknown block name; a missing or misshapen feature
      (the message names the block and the shapes).
  """
  if fusion not in FUSION_MODES:
    raise ValueError(f"DiffusionUNet fusion must be one of {FUSION_MODES}, got {fusion!r}")
  if fusion == "none":
    if fused is not None or fusion_blocks:
      raise ValueError("DiffusionUNet has fusion='none' but got fused features or "
                       f"fusion_blocks={tuple(fusion_blocks)}; set fusion to 'skip' "
                       "or 'caa', or drop them")
    return
  blocks = decoder_blocks(channel_mult, num_res_blocks)
  unknown = [n for n in fusion_blocks if n not in blocks]
  if unknown:
    raise ValueError(f"DiffusionUNet fusion_blocks {unknown} do not exist; this UNet's "
                     f"decoder blocks are {list(blocks)}")
  b, h, w = x_shape[:3]
  for name in fusion_blocks:
    ds = blocks[name].ds
    want = (b, h // ds, w // ds)
    if fused is None or name not in fused:
      raise ValueError(f"DiffusionUNet: fused feature {name!r} (in fusion_blocks) is "
                       f"missing; expected shape {want} + (C_f,)")
    shape = tuple(fused[name].shape)
    if len(shape) != 4 or shape[:3] != want:
      raise ValueError(f"DiffusionUNet: fused feature {name!r} has shape {shape}, "
                       f"expected (B, h, w) = {want} + (C_f,) (block {name} is at "
                       f"downsample factor {ds})")


def fuse(h: jnp.ndarray, f: jnp.ndarray, fusion: str, name: str, *,
         num_heads: int, head_dim: int, max_groups: int, dtype: Dtype,
         implementation: str | None = None) -> jnp.ndarray:
  """Fuses the external feature f (B, h, w, C_f) into block output h (B, h, w, C).

  Call inside the UNet's compact method: the layer is its child ``name +
  "_caa"`` (``AttentionBlock(h, f as h*w tokens)``) or ``name + "_skip"``
  (``h + conv1x1(f)``); both have zero-initialized outputs, so a fresh layer
  returns h unchanged.
  """
  f = f.astype(dtype)
  if fusion == "skip":
    return h + conv(h.shape[-1], dtype, f"{name}_skip", kernel=1, zero=True)(f)
  b, fh, fw, c = f.shape
  return AttentionBlock(num_heads, head_dim, max_groups, dtype, implementation,
                        name=f"{name}_caa")(h, f.reshape(b, fh * fw, c))
