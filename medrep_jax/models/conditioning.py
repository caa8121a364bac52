"""Conditioned pieces of the diffusion UNet: time embedding, SPADE, ResBlock, Psi_FC.

* ``timestep_embedding`` + ``TimestepEmbedding``: the sinusoidal position
  embedding of the diffusion step t (Vaswani et al., 2017, Sec. 3.5; Ho et
  al., 2020, App. B) followed by a two-layer SiLU MLP, as in DDPM/ADM.
* ``group_norm``: GroupNorm computed in float32 (the house rule for norms).
* ``SPADE``: spatially-adaptive normalization (Park et al., CVPR 2019, eq. 1):
  parameter-free GroupNorm, then ``x * (1 + gamma(m)) + beta(m)`` with gamma,
  beta predicted per pixel from the semantic map m by a small conv net. DSDM
  (paper 004, Sec. III-B2) uses it in place of GroupNorm in the decoder
  ResBlocks of the denoising UNet.
* ``ResBlock``: the ADM residual block conditioned on the time embedding
  (FiLM) and, in the decoder, on the semantic map (SPADE).
* ``ReferenceTokens``: the embedding transform layer Psi_FC of DSDM's MCAA
  (paper 004, eq. 10): a Dense layer that maps the global reference-image
  embedding F_r (B, n) to a sequence of tokens used as keys and values of
  cross-attention at one UNet resolution.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from medrep_jax.models.resnet import Dtype, group_count

_PAD3 = ((1, 1), (1, 1))


def conv(features: int, dtype: Dtype, name: str, kernel: int = 3,
         strides: int = 1, zero: bool = False) -> nn.Conv:
  """3x3 (padding 1) or 1x1 conv, float32 params; ``zero`` zero-inits it."""
  pad = _PAD3 if kernel == 3 else ((0, 0), (0, 0))
  kw = {"kernel_init": nn.initializers.zeros} if zero else {}
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=pad,
                 dtype=dtype, param_dtype=jnp.float32, name=name, **kw)


def upsample_nearest(x: jnp.ndarray) -> jnp.ndarray:
  """x2 nearest-neighbour upsampling of NHWC ``x``."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def timestep_embedding(t: jnp.ndarray, dim: int,
                       max_period: float = 10_000.0) -> jnp.ndarray:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Frequencies are ``max_period ** (-i / (dim // 2))`` for i < dim // 2; the
  output is ``[cos(t f), sin(t f)]`` (zero-padded by one column if ``dim`` is
  odd).

  Args:
    t: timesteps, shape (B,), integer or float.
    dim: embedding width.
    max_period: the longest wavelength.

  Returns:
    float32 array (B, dim).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """Sinusoidal embedding of t -> Dense -> SiLU -> Dense (``features`` wide).

  Attributes:
    features: output width (4 x the UNet base width in DDPM/ADM).
    sinusoid_dim: width of the sinusoidal embedding (the base width).
    dtype: compute dtype of the Dense layers; parameters are float32.
  """
  features: int
  sinusoid_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    e = timestep_embedding(t, self.sinusoid_dim).astype(self.dtype)
    e = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                 name="dense_0")(e)
    return nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                    name="dense_1")(nn.silu(e))


def group_norm(x: jnp.ndarray, max_groups: int, *, name: str,
               affine: bool = True) -> jnp.ndarray:
  """GroupNorm (eps 1e-5) inside the caller's compact scope, output float32.

  Uses ``group_count(C, max_groups)`` groups: the largest count <=
  ``max_groups`` dividing C, so small test widths work.
  """
  return nn.GroupNorm(num_groups=group_count(x.shape[-1], max_groups),
                      epsilon=1e-5, use_scale=affine, use_bias=affine,
                      dtype=jnp.float32, param_dtype=jnp.float32,
                      name=name)(x.astype(jnp.float32))


class SPADE(nn.Module):
  """Spatially-adaptive GroupNorm (Park et al., 2019; DSDM Sec. III-B2).

  ``out = GN(x) * (1 + gamma(m)) + beta(m)``, where GN has no affine
  parameters and ``m`` is the semantic map resized (nearest) to x's spatial
  size; gamma and beta come from a shared 3x3 conv + ReLU (``hidden`` wide)
  followed by one 3x3 conv each. An all-zero map (the null condition of
  classifier-free guidance) gives the spatially constant modulation set by
  the conv biases.

  Attributes:
    max_groups: GroupNorm group cap (see ``group_norm``).
    hidden: width of the shared conv (128 in Park et al.).
    dtype: compute dtype of the convs; the result is float32.
  """
  max_groups: int = 32
  hidden: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, segmap: jnp.ndarray) -> jnp.ndarray:
    normed = group_norm(x, self.max_groups, affine=False, name="norm")
    b, h, w, c = x.shape
    m = segmap
    if m.shape[1:3] != (h, w):
      m = jax.image.resize(m, (b, h, w, m.shape[-1]), "nearest")
    a = nn.relu(conv(self.hidden, self.dtype, "shared")(m.astype(self.dtype)))
    gamma = conv(c, self.dtype, "gamma")(a).astype(jnp.float32)
    beta = conv(c, self.dtype, "beta")(a).astype(jnp.float32)
    return normed * (1.0 + gamma) + beta


class ReferenceTokens(nn.Module):
  """Psi_FC of DSDM's MCAA (paper 004, eq. 10): embedding -> token sequence.

  Maps F_r (B, n) with one Dense layer to ``num_tokens * token_dim`` values,
  reshaped to (B, num_tokens, token_dim). With ``num_tokens = h * w`` (the
  paper's reading) the tokens align one-to-one with the positions of the
  UNet feature map at that resolution.
  """
  num_tokens: int
  token_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ref_embed: jnp.ndarray) -> jnp.ndarray:
    y = nn.Dense(self.num_tokens * self.token_dim, dtype=self.dtype,
                 param_dtype=jnp.float32, name="fc")(ref_embed.astype(self.dtype))
    return y.reshape(ref_embed.shape[0], self.num_tokens, self.token_dim)


class ResBlock(nn.Module):
  """ADM residual block with time-embedding FiLM and optional SPADE norms.

  ``h = conv_in(SiLU(N_in(x)))``; ``h = N_out(h) * (1 + s) + b`` with
  (s, b) = Dense(SiLU(emb)) when ``use_scale_shift_norm`` (else
  ``N_out(h + Dense(SiLU(emb)))``); ``out = skip(x) + conv_out(dropout(
  SiLU(h)))`` with ``conv_out`` zero-initialized. N is GroupNorm, or SPADE
  on ``segmap`` when ``spade_hidden > 0``. ``updown`` ("up"/"down")
  resamples inside the block (BigGAN-style, ``resblock_updown``).
  """
  out_channels: int
  max_groups: int = 32
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  spade_hidden: int = 0
  updown: str = "none"
  dtype: Dtype = jnp.float32

  def _norm(self, h: jnp.ndarray, segmap: jnp.ndarray | None,
            which: str) -> jnp.ndarray:
    if self.spade_hidden > 0:
      return SPADE(self.max_groups, self.spade_hidden, self.dtype,
                   name=f"spade_{which}")(h, segmap)
    return group_norm(h, self.max_groups, name=f"norm_{which}")

  @nn.compact
  def __call__(self, x: jnp.ndarray, emb: jnp.ndarray,
               segmap: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    if self.updown not in ("none", "up", "down"):
      raise ValueError(f"ResBlock updown must be 'none', 'up' or 'down', got {self.updown!r}")
    if self.spade_hidden > 0 and segmap is None:
      raise ValueError("ResBlock with SPADE (spade_hidden > 0) needs a segmap")
    c = self.out_channels
    h = nn.silu(self._norm(x, segmap, "in")).astype(self.dtype)
    if self.updown != "none":
      resample = upsample_nearest if self.updown == "up" else _avg_pool2
      h, x = resample(h), resample(x)
    h = conv(c, self.dtype, "conv_in")(h)
    e = nn.Dense(2 * c if self.use_scale_shift_norm else c, dtype=self.dtype,
                 param_dtype=jnp.float32, name="emb_proj")(nn.silu(emb))
    e = e.astype(jnp.float32)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self._norm(h, segmap, "out") * (1.0 + scale) + shift
    else:
      h = self._norm(h.astype(jnp.float32) + e, segmap, "out")
    h = nn.silu(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(c, self.dtype, "conv_out", zero=True)(h)
    skip = x if x.shape[-1] == c else conv(c, self.dtype, "skip", kernel=1)(x)
    return skip.astype(self.dtype) + h
