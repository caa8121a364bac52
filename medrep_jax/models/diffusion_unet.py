"""Time-conditioned diffusion UNet shared by the LDM, LTDiff++ and DSDM methods.

The backbone follows DDPM (Ho et al., 2020) as refined by improved DDPM /
ADM (Nichol & Dhariwal, 2021; Dhariwal & Nichol, 2021): residual blocks
conditioned on a sinusoidal time embedding (FiLM "scale-shift norm"),
multi-head self-attention at chosen resolutions, a ResBlock-attention-ResBlock
middle and a mirrored up path with skip concatenations. It predicts
eps_theta(x_t, t) for the losses of LDM eq. 2 (paper 000) and DSDM's hybrid
loss (paper 004); with ``learned_variance`` it also outputs the v of
improved DDPM's learned-range variance.

Optional conditioning (each creates parameters only when its attribute is
set, and then its call argument is required):

* ``num_classes``: class label y added to the time embedding; index
  ``num_classes`` is the null label of classifier-free guidance.
* ``spade_channels``: semantic map injected by SPADE in every up-path
  ResBlock (DSDM Sec. III-B2; Park et al., 2019) and, with ``spade_mid``, in
  the two middle ResBlocks too (as SDM, Wang et al., 2022, the backbone DSDM
  cites). Null condition: all zeros.
* ``context_dim``: cross-attention to a sequence (B, L, context_dim) at the
  attention resolutions (LDM eq. 3).
* ``ref_embed_dim``: DSDM's MCAA (paper 004, eq. 10-11): a reference
  embedding (B, n) mapped by a per-resolution Psi_FC to tokens that are the
  keys/values of cross-attention at ``ref_attention_resolutions`` (default:
  the attention resolutions) and in the middle iff ``mid_attention``.
  Null: zeros.
* ``concat_channels``: a latent concatenated to x_t at the input (LTDiff++,
  paper 003: the denoiser of Z_B is conditioned on Z_A by concatenation).
* ``fusion``: external decoder features ``fused`` (DSDM's segmentation net,
  paper 004 Sec. IV-C2: features of the frozen DSDM) enter the up-path blocks
  ``fusion_blocks`` by cross-attention ("caa") or a 1x1-conv skip ("skip").

Decoder blocks: ``dec_i`` (1-based, deepest first; ``decoder_blocks``) is the
output of up-path block i (ResBlock ``up_{l}_{b}`` + its attention + fusion)
BEFORE the level's upsampling. ADM/SDM's code numbers the same blocks
``output_blocks[k]``, 0-based: ``output_blocks[k]`` is ``dec_{k+1}`` (so the
DSDM paper's "blocks 6-10", read as SDM indices, are dec_7..dec_11). ADM puts
the upsampling inside the last block of every level but level 0, so that
block's output has twice the resolution (and the upsample conv) of dec_{k+1}.

Parameter names (top level): ``time_embed``, ``label_embed``, ``input_conv``,
``down_{l}_{b}`` (ResBlock b of level l), ``down_{l}_downsample``,
``mid_0``/``mid_1``, ``up_{l}_{b}``, ``up_{l}_upsample``, ``out_norm``,
``out_conv``; attention layers append ``_attn`` (self), ``_xattn`` (context)
and ``_ref_xattn`` (MCAA) to their block's name (``mid`` in the middle);
Psi_FC layers are ``ref_fc_ds{ds}``; fusion layers are ``up_{l}_{b}_caa``
(``AttentionBlock``) or ``up_{l}_{b}_skip`` (1x1 conv). ResBlocks name their
norms ``spade_in``/``spade_out`` with SPADE and ``norm_in``/``norm_out``
without, so a GroupNorm UNet (DSDM's segmentation stage: spade_channels=0,
ref_embed_dim=0, the other attributes equal) has every path of the SPADE+MCAA
UNet except the SPADE, MCAA (``*_ref_xattn``, ``ref_fc_ds*``) and, when the
channels differ, ``out_conv`` ones, with the same shapes.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models.attention import AttentionBlock
from medrep_jax.models.conditioning import (ReferenceTokens, ResBlock,
                                            TimestepEmbedding, conv,
                                            group_norm, upsample_nearest)
from medrep_jax.models.feature_fusion import (DecoderBlock, check_fusion,  # noqa: F401
                                              decoder_block_names,
                                              decoder_blocks, fuse)
from medrep_jax.models.resnet import Dtype


class DiffusionUNet(nn.Module):
  """eps_theta(x_t, t, conditions): the denoising UNet of LDM, LTDiff++, DSDM.

  Attributes:
    out_channels: C, the channels of x_0 (the output has 2C with
      ``learned_variance``: [eps (C), v (C)], v the improved-DDPM
      interpolation between beta_t and beta~_t in log space).
    learned_variance: double the output channels (DSDM's hybrid loss).
    base_width: channels of level 0; level l has ``base_width *
      channel_mult[l]``; the time embedding is 4 x base_width wide.
    channel_mult: width multipliers, one per level; level l works at
      downsample factor ``ds = 2**l``.
    num_res_blocks: ResBlocks per level on the down path (the up path has
      one more per level, as in ADM).
    attention_resolutions: the DOWNSAMPLE FACTORS ds at which blocks get
      attention (as in ADM's and LDM's code): with 64x64 inputs, ds=4 is the
      16x16 map. Factors, not sizes, so the parameter tree does not depend on
      the input size.
    mid_attention: self-/cross-attention in the middle block (ADM: always).
    num_heads: attention heads when ``head_dim`` is 0.
    head_dim: fixed head width (LDM: 32) when > 0.
    dropout: ResBlock dropout (needs a "dropout" rng when training).
    norm_groups: GroupNorm group cap (the largest count <= it dividing C).
    use_scale_shift_norm: FiLM norm(h) * (1 + scale) + shift from the time
      embedding; else the embedding is added before the norm (DDPM).
    resblock_updown: resample inside ResBlocks instead of a strided conv
      (down) / nearest upsample + conv (up).
    num_classes: >0 adds a class-embedding table with num_classes + 1 rows;
      row ``num_classes`` is the null label for classifier-free guidance.
    spade_channels: >0 enables SPADE (channels K of the semantic map) in the
      up-path ResBlocks; ``spade_hidden`` is its shared-conv width.
    context_dim: >0 adds cross-attention to ``context`` (B, L, context_dim).
    ref_embed_dim: >0 adds MCAA cross-attention to the Psi_FC tokens of
      ``ref_embed`` (B, ref_embed_dim), ``ref_token_dim`` wide.
    ref_num_tokens: tokens per Psi_FC; 0 (the paper) means h*w of the
      resolution, which ties those parameters to the training input size.
    concat_channels: >0 concatenates ``concat`` (B, H, W, c) to x_t.
    dtype: compute dtype (e.g. jnp.bfloat16); params, norms, softmax and the
      output are float32.
    attention_impl: ``jax.nn.dot_product_attention`` implementation.
    remat: recompute each ResBlock's activations in the backward pass
      (``nn.remat``): less memory for about one more forward pass.
    spade_mid: with ``spade_channels`` > 0, SPADE also in the middle
      ResBlocks ``mid_0``/``mid_1`` (SDM); ignored when spade_channels is 0.
    ref_attention_resolutions: the downsample factors with MCAA (each a
      level's 2**l); None means ``attention_resolutions``. A factor without
      self-attention gets the MCAA block alone. The middle block has MCAA
      iff ``mid_attention``, whatever this says. Ignored without
      ``ref_embed_dim``.
    fusion: "none", or how the ``fused`` features enter ``fusion_blocks``:
      "caa" (paper 004 Sec. IV-C2): ``AttentionBlock`` with queries from the
      block's features, keys/values from the fused feature's h*w tokens;
      "skip" (its ablation): ``h + conv1x1(f)``. Both have zero-initialized
      outputs, so fresh fusion layers are the identity.
    fusion_blocks: names ``dec_i`` of the fused up-path blocks (see
      ``decoder_blocks``).
  """
  out_channels: int
  learned_variance: bool = False
  base_width: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4, 8)
  mid_attention: bool = True
  num_heads: int = 4
  head_dim: int = 0
  dropout: float = 0.0
  norm_groups: int = 32
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  num_classes: int = 0
  spade_channels: int = 0
  spade_hidden: int = 128
  context_dim: int = 0
  ref_embed_dim: int = 0
  ref_token_dim: int = 64
  ref_num_tokens: int = 0
  concat_channels: int = 0
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat: bool = False
  spade_mid: bool = False
  ref_attention_resolutions: Sequence[int] | None = None
  fusion: str = "none"
  fusion_blocks: Sequence[str] = ()

  def _res(self, width: int, name: str, spade: bool = False,
           updown: str = "none") -> ResBlock:
    # With remat, `train` (argument 4, counting self) must be static: it gates dropout.
    block = nn.remat(ResBlock, static_argnums=(4,)) if self.remat else ResBlock
    return block(width, self.norm_groups, self.dropout,
                    self.use_scale_shift_norm,
                    self.spade_hidden if spade else 0, updown, self.dtype,
                    name=name)

  def _check_inputs(self, x, t, conds: Mapping[str, Any]) -> jnp.ndarray:
    """Validates shapes; returns t broadcast to (B,). Raises ValueError."""
    if x.ndim != 4:
      raise ValueError(f"DiffusionUNet expects x of shape (B, H, W, C), got {x.shape}")
    b, h, w, _ = x.shape
    f = 2 ** (len(self.channel_mult) - 1)
    if h % f or w % f:
      raise ValueError(f"DiffusionUNet: spatial size {(h, w)} must be divisible by "
                       f"{f} (2**(len(channel_mult) - 1))")
    expected = {  # argument: (enabling attribute, its value, expected shape)
        "y": ("num_classes", self.num_classes, (b,)),
        "spatial_cond": ("spade_channels", self.spade_channels,
                         (b, None, None, self.spade_channels)),
        "context": ("context_dim", self.context_dim, (b, None, self.context_dim)),
        "ref_embed": ("ref_embed_dim", self.ref_embed_dim, (b, self.ref_embed_dim)),
        "concat": ("concat_channels", self.concat_channels,
                   (b, h, w, self.concat_channels)),
    }
    for arg, (attr, value, shape) in expected.items():
      a = conds[arg]
      if value and a is None:
        raise ValueError(f"DiffusionUNet has {attr}={value} but the conditioning "
                         f"input {arg!r} is missing")
      if not value and a is not None:
        raise ValueError(f"DiffusionUNet got {arg!r} but {attr}=0 (conditioning "
                         "disabled); set the attribute or drop the input")
      if a is not None and (a.ndim != len(shape) or any(
          s is not None and s != d for s, d in zip(shape, a.shape))):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"DiffusionUNet: {arg!r} has shape {a.shape}, expected ({want})")
    if conds["y"] is not None and not jnp.issubdtype(conds["y"].dtype, jnp.integer):
      raise ValueError(f"DiffusionUNet: 'y' must be integer labels, got {conds['y'].dtype}")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
      raise ValueError(f"DiffusionUNet: t has shape {t.shape}, expected () or ({b},)")
    return t

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, *,
               y: jnp.ndarray | None = None,
               spatial_cond: jnp.ndarray | None = None,
               context: jnp.ndarray | None = None,
               ref_embed: jnp.ndarray | None = None,
               concat: jnp.ndarray | None = None,
               fused: Mapping[str, jnp.ndarray] | None = None,
               train: bool = False, return_features: bool = False):
    """Predicts eps (and v) for x_t at timesteps t.

    Args:
      x: noisy input x_t (B, H, W, C); H, W divisible by 2**(levels - 1).
      t: timesteps, () or (B,), integer or float.
      y: int labels (B,) in [0, num_classes]; num_classes is the null label.
      spatial_cond: semantic map (B, H', W', spade_channels), any H', W'
        (resized nearest per block), e.g. a one-hot mask; zeros = null.
      context: cross-attention sequence (B, L, context_dim).
      ref_embed: reference-image embedding (B, ref_embed_dim); zeros = null.
      concat: latent (B, H, W, concat_channels) concatenated to x_t.
      fused: {"dec_i": (B, h_i, w_i, C_f)} external features for the
        ``fusion_blocks`` (e.g. another DiffusionUNet's ``return_features``
        dict; other names are ignored); None when fusion is "none".
      train: enables dropout.
      return_features: also return the decoder features.

    Returns:
      float32 (B, H, W, out_channels * (2 if learned_variance else 1)); with
      ``return_features``, ``(output, {"dec_1": ..., "dec_N": ...})`` where
      dec_i is the output of the i-th up-path block (ResBlock + attention
      + fusion), deepest first, before any upsampling, in the compute dtype.

    Raises:
      ValueError: a conditioning input is missing for an enabled attribute,
        given for a disabled one, or has the wrong shape; x or t malformed;
        a bad fusion setting, fusion block name or fused feature (the message
        names the block and shapes); ref_attention_resolutions not levels.
    """
    conds = dict(y=y, spatial_cond=spatial_cond, context=context,
                 ref_embed=ref_embed, concat=concat)
    t = self._check_inputs(x, t, conds)
    check_fusion(self.fusion, self.fusion_blocks, self.channel_mult,
                 self.num_res_blocks, x.shape, fused)
    attn_res = tuple(self.attention_resolutions)
    ref_res = attn_res
    if self.ref_attention_resolutions is not None:
      ref_res = tuple(self.ref_attention_resolutions)
      levels = [2 ** l for l in range(len(self.channel_mult))]
      if not set(ref_res) <= set(levels):
        raise ValueError(f"DiffusionUNet ref_attention_resolutions={ref_res} must be "
                         f"downsample factors of its levels {levels}")
    emb_dim = 4 * self.base_width
    emb = TimestepEmbedding(emb_dim, self.base_width, self.dtype,
                            name="time_embed")(t)
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype,
                           param_dtype=jnp.float32, name="label_embed")(y)
    if self.concat_channels:
      x = jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)

    ref_tokens: dict[int, jnp.ndarray] = {}

    block = functools.partial(AttentionBlock, self.num_heads, self.head_dim,
                              self.norm_groups, self.dtype, self.attention_impl)

    def attend(h: jnp.ndarray, name: str, ds: int, attn: bool,
               mcaa: bool) -> jnp.ndarray:
      if attn:
        h = block(name=f"{name}_attn")(h)
        if self.context_dim:
          h = block(name=f"{name}_xattn")(h, context)
      if mcaa and self.ref_embed_dim:
        if ds not in ref_tokens:  # One Psi_FC per resolution (eq. 10).
          n = self.ref_num_tokens or h.shape[1] * h.shape[2]
          ref_tokens[ds] = ReferenceTokens(n, self.ref_token_dim, self.dtype,
                                           name=f"ref_fc_ds{ds}")(ref_embed)
        h = block(name=f"{name}_ref_xattn")(h, ref_tokens[ds])
      return h

    h = conv(self.base_width, self.dtype, "input_conv")(x.astype(self.dtype))
    skips = [h]
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      ds = 2 ** level
      for i in range(self.num_res_blocks):
        h = self._res(self.base_width * mult, f"down_{level}_{i}")(h, emb, None, train)
        h = attend(h, f"down_{level}_{i}", ds, ds in attn_res, ds in ref_res)
        skips.append(h)
      if level != last:
        name = f"down_{level}_downsample"
        if self.resblock_updown:
          h = self._res(h.shape[-1], name, updown="down")(h, emb, None, train)
        else:
          h = conv(h.shape[-1], self.dtype, name, strides=2)(h)
        skips.append(h)

    segmap = spatial_cond
    if segmap is not None:
      segmap = segmap.astype(self.dtype)
    width, spade = h.shape[-1], bool(self.spade_channels)
    h = self._res(width, "mid_0", spade=spade and self.spade_mid)(h, emb, segmap, train)
    h = attend(h, "mid", 2 ** last, self.mid_attention, self.mid_attention)
    h = self._res(width, "mid_1", spade=spade and self.spade_mid)(h, emb, segmap, train)

    features = {}
    for level in reversed(range(len(self.channel_mult))):
      ds = 2 ** level
      out_width = self.base_width * self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        name, dec = f"up_{level}_{i}", f"dec_{len(features) + 1}"
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._res(out_width, name, spade=spade)(h, emb, segmap, train)
        h = attend(h, name, ds, ds in attn_res, ds in ref_res)
        if self.fusion != "none" and dec in self.fusion_blocks:
          h = fuse(h, fused[dec], self.fusion, name, num_heads=self.num_heads,
                   head_dim=self.head_dim, max_groups=self.norm_groups,
                   dtype=self.dtype, implementation=self.attention_impl)
        features[dec] = h
      if level:
        name = f"up_{level}_upsample"
        if self.resblock_updown:
          h = self._res(out_width, name, spade=spade, updown="up")(
              h, emb, segmap, train)
        else:
          h = conv(out_width, self.dtype, name)(upsample_nearest(h))

    h = nn.silu(group_norm(h, self.norm_groups, name="out_norm")).astype(self.dtype)
    channels = self.out_channels * (2 if self.learned_variance else 1)
    out = conv(channels, self.dtype, "out_conv", zero=True)(h).astype(jnp.float32)
    return (out, features) if return_features else out


_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: compiles in seconds at 8-16 px.
    "tiny": dict(base_width=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=2, spade_hidden=16,
                 ref_token_dim=16),
    # Quick experiments at 32-64 px on CPU or one GPU.
    "small": dict(base_width=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                  attention_resolutions=(4,), head_dim=32, spade_hidden=64),
    # LDM latent UNet for 64x64xc latents (f=4): the LDM-4 layout of Rombach
    # et al. (channel_mult (1,2,3,4), 2 ResBlocks, attention at ds 2,4,8 =
    # 32,16,8 px, 32-channel heads) at base width 128; their CelebA-HQ/FFHQ
    # LDM-4 uses base_width=224 (pass it as an override).
    "ldm": dict(base_width=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                attention_resolutions=(2, 4, 8), head_dim=32),
}
DIFFUSION_UNET_SIZES = tuple(_PRESETS)


def diffusion_unet_config(size: str, **overrides: Any) -> dict[str, Any]:
  """DiffusionUNet keyword arguments of a named size, updated by ``overrides``.

  Raises:
    ValueError: unknown ``size`` (the message lists the valid sizes).
  """
  if size not in _PRESETS:
    raise ValueError(f"unknown diffusion UNet size {size!r}; valid sizes: "
                     f"{list(_PRESETS)}")
  return {**_PRESETS[size], **overrides}


def get_diffusion_unet(size: str, out_channels: int, **overrides: Any) -> DiffusionUNet:
  """``DiffusionUNet(out_channels, **diffusion_unet_config(size, **overrides))``."""
  return DiffusionUNet(out_channels=out_channels,
                       **diffusion_unet_config(size, **overrides))
