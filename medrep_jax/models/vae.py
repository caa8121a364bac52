"""KL-regularized autoencoder (stage 1 of the LDM) and a PatchGAN discriminator.

The DCL-CsTP paper (IEEE Access 2025, Sec. III-B, eq. 1 and Sec. IV-A-1,
"Stage 1") trains an autoencoder ``Z = E(x)``, ``x_hat = D(Z_hat)`` that maps
256x256xC images to 64x64xc latents (downsampling factor f = 4), following
the KL-regularized first stage of Rombach et al., "High-Resolution Image
Synthesis with Latent Diffusion Models", CVPR 2022 (Sec. 3.1, App. G). The
encoder outputs the parameters of a diagonal Gaussian posterior q(z|x)
(Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014), which a
small KL term pulls towards N(0, I) (see ``medrep_jax.losses.vae``).

Architecture (Rombach et al. 2022, App. G, the "KL-f4" model): a conv stem,
``len(channel_mult)`` levels of ``num_res_blocks`` ResBlocks (GroupNorm +
SiLU + 3x3 conv, twice, with a residual), a stride-2 conv between levels, a
middle block (ResBlock, optional single-head self-attention, ResBlock), then
GroupNorm + SiLU + 3x3 conv to ``2 * latent_channels`` moments and a 1x1
"quant" conv. The decoder mirrors it with ``num_res_blocks + 1`` ResBlocks
per level and nearest-neighbour x2 upsampling + 3x3 conv. The downsampling
factor is ``2 ** (len(channel_mult) - 1)``. Images are expected in [-1, 1];
the decoder output is linear (no tanh), as in the LDM autoencoder.

GroupNorm is ``make_norm("group")`` (up to 32 groups, eps 1e-5; the LDM code
uses exactly 32 groups and eps 1e-6). Convs use PyTorch's default init, as the
reference does.

Precision: convolutions run in ``dtype`` (e.g. bfloat16); parameters are
float32; GroupNorm statistics, the attention softmax, the posterior moments
and the decoder output are float32.

Latent scaling: the LDM diffusion stage trains on ``scale_factor * z`` with
``scale_factor = 1 / std(z)`` estimated once on a batch of training latents
(Rombach et al. 2022, Sec. 4.3.2 / App. G; Stable Diffusion's 0.18215 is
such an estimate). ``estimate_scale_factor`` computes it; the diffusion stage
stores it and divides by it before ``decode``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from medrep_jax.models.attention import attention
from medrep_jax.models.resnet import Dtype, make_norm

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
_PAD3 = ((1, 1), (1, 1))


@flax.struct.dataclass
class DiagonalGaussian:
  """Diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar))).

  A pytree (it can be returned from ``jax.jit``). Both fields are float32 of
  shape (B, h, w, c); ``logvar`` is clipped to [LOGVAR_MIN, LOGVAR_MAX].
  """
  mean: jnp.ndarray
  logvar: jnp.ndarray

  @classmethod
  def from_moments(cls, moments: jnp.ndarray) -> "DiagonalGaussian":
    """Splits (..., 2c) moments into mean and clipped logvar (float32)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jnp.ndarray:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jnp.ndarray:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jnp.ndarray:
    """Reparameterized sample z = mean + std * eps, eps ~ N(0, I) (Kingma & Welling, eq. 10)."""
    eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
    return self.mean + self.std * eps

  def mode(self) -> jnp.ndarray:
    """The posterior mode (= mean), the deterministic latent."""
    return self.mean

  def kl(self) -> jnp.ndarray:
    """KL(q || N(0, I)) per example, summed over all non-batch dims: shape (B,).

    0.5 * sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, App. B).
    """
    kl = 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)


def estimate_scale_factor(latents: jnp.ndarray) -> jnp.ndarray:
  """LDM latent scale factor 1 / std(latents) over all elements (float32 scalar).

  Pass posterior samples (or modes) of a batch of training images; the
  diffusion model then trains on ``scale_factor * z`` which has ~unit std.
  """
  std = jnp.std(jnp.asarray(latents, jnp.float32))
  return 1.0 / jnp.maximum(std, 1e-12)


# PyTorch's default conv init (kaiming_uniform with a = sqrt(5)), the init of
# the reference LDM autoencoder: U(-b, b) with b = 1 / sqrt(fan_in).
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None = None,
          strides: int = 1, padding: Any = None) -> nn.Conv:
  if padding is None:
    padding = _PAD3 if kernel == 3 else "VALID"
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=_KERNEL_INIT,
                 name=name)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv3x3 twice plus a (1x1-projected) shortcut."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = nn.silu(make_norm("group", x, False, name="norm1", dtype=self.dtype))
    h = _conv(self.features, 3, self.dtype, "conv1")(h)
    h = nn.silu(make_norm("group", h, False, name="norm2", dtype=self.dtype))
    h = _conv(self.features, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "shortcut")(x)
    return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual (LDM mid block).

  Uses ``models.attention.attention`` (``jax.nn.dot_product_attention``'s math:
  softmax in float32; in bf16 every dot of the forward and backward has bf16 operands).
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    y = make_norm("group", x, False, name="norm", dtype=self.dtype)
    q, k, v = (_conv(c, 1, self.dtype, n)(y).reshape(b, h * w, 1, c)
               for n in ("q", "k", "v"))
    y = attention(q, k, v).reshape(b, h, w, c)
    return x.astype(self.dtype) + _conv(c, 1, self.dtype, "proj_out")(y)


class _MidBlock(nn.Module):
  features: int
  attn: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = ResBlock(self.features, self.dtype, name="block1")(x)
    if self.attn:
      x = AttnBlock(self.dtype, name="attn")(x)
    return ResBlock(self.features, self.dtype, name="block2")(x)


class Encoder(nn.Module):
  """x (B, H, W, C) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2**(levels-1).

  Attributes:
    latent_channels: c, the latent width (the output has 2c moment channels).
    base_width: width of level 0; level i has ``base_width * channel_mult[i]``.
    channel_mult: per-level width multipliers.
    num_res_blocks: ResBlocks per level.
    attn_mid: self-attention in the middle block.
    dtype: compute dtype.
  """
  latent_channels: int = 3
  base_width: int = 128
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_mid: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    f = 2 ** (len(self.channel_mult) - 1)
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"Encoder expects NHWC images with H and W divisible by {f}, "
                       f"got shape {x.shape}")
    h = _conv(self.base_width, 3, self.dtype, "conv_in")(x.astype(self.dtype))
    for i, mult in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.base_width * mult, self.dtype, name=f"down{i}_block{j}")(h)
      if i < len(self.channel_mult) - 1:
        # Asymmetric (0, 1) padding + 3x3 stride-2 conv halves H and W exactly.
        h = _conv(h.shape[-1], 3, self.dtype, f"down{i}_downsample", strides=2,
                  padding=((0, 1), (0, 1)))(h)
    h = _MidBlock(h.shape[-1], self.attn_mid, self.dtype, name="mid")(h)
    h = nn.silu(make_norm("group", h, False, name="norm_out", dtype=self.dtype))
    return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """z (B, h, w, c) -> image (B, f*h, f*w, out_channels), float32, linear output.

  Attributes mirror ``Encoder``; each level has ``num_res_blocks + 1``
  ResBlocks, and levels are walked deepest first.
  """
  out_channels: int
  base_width: int = 128
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_mid: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    width = self.base_width * self.channel_mult[-1]
    h = _conv(width, 3, self.dtype, "conv_in")(z.astype(self.dtype))
    h = _MidBlock(width, self.attn_mid, self.dtype, name="mid")(h)
    for i in reversed(range(len(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResBlock(self.base_width * self.channel_mult[i], self.dtype,
                     name=f"up{i}_block{j}")(h)
      if i > 0:
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
        h = _conv(c, 3, self.dtype, f"up{i}_upsample")(h)
    h = nn.silu(make_norm("group", h, False, name="norm_out", dtype=self.dtype))
    h = _conv(self.out_channels, 3, self.dtype, "conv_out")(h)
    return h.astype(jnp.float32)


class AutoencoderKL(nn.Module):
  """KL-regularized autoencoder (Rombach et al. 2022; DCL-CsTP eq. 1).

  Attributes:
    in_channels: image channels C (1 for grey, 3 for RGB); also the output's.
    latent_channels: c (3 in the LDM KL-f4 model used by the paper).
    base_width, channel_mult, num_res_blocks, attn_mid: see ``Encoder``.
    dtype: compute dtype; parameters are float32.

  Methods (all usable through ``model.apply(variables, ..., method=...)``):
    ``encode(x) -> DiagonalGaussian``; ``decode(z) -> x_rec`` (float32);
    ``__call__(x, rng=None, sample_posterior=True) -> (x_rec, posterior)``.
  Initialize with ``model.init(key, x)`` (the posterior mode is used when no
  sampling key is given) or ``model.init(key, x, sample_key)``.
  """
  in_channels: int
  latent_channels: int = 3
  base_width: int = 128
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_mid: bool = True
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  def setup(self):
    arch = dict(base_width=self.base_width, channel_mult=tuple(self.channel_mult),
                num_res_blocks=self.num_res_blocks, attn_mid=self.attn_mid,
                dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **arch)
    self.decoder = Decoder(out_channels=self.in_channels, **arch)
    # 1x1 convs on the moments / latents, float32 (cheap, and keep logvar precise).
    self.quant_conv = _conv(2 * self.latent_channels, 1, jnp.float32)
    self.post_quant_conv = _conv(self.latent_channels, 1, jnp.float32)

  def encode(self, x: jnp.ndarray) -> DiagonalGaussian:
    """q(z|x) for images x (B, H, W, in_channels) in [-1, 1]."""
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"AutoencoderKL expects {self.in_channels} channels, "
                       f"got shape {x.shape}")
    moments = self.quant_conv(self.encoder(x).astype(jnp.float32))
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """Images (B, f*h, f*w, in_channels) float32 from latents z (B, h, w, c).

    ``z`` is the unscaled latent: divide diffusion samples by the scale
    factor first.
    """
    if z.shape[-1] != self.latent_channels:
      raise ValueError(f"decode expects {self.latent_channels} latent channels, "
                       f"got shape {z.shape}")
    return self.decoder(self.post_quant_conv(z.astype(jnp.float32)))

  def __call__(self, x: jnp.ndarray, rng: jax.Array | None = None,
               sample_posterior: bool = True) -> tuple[jnp.ndarray, DiagonalGaussian]:
    """Reconstruction and posterior: decode(sample or mode of encode(x)).

    Args:
      x: images (B, H, W, in_channels) in [-1, 1]; H, W divisible by f.
      rng: key for the reparameterized sample. If None while
        ``sample_posterior`` is True, the flax RNG stream "sample" is used
        (pass ``rngs={"sample": key}`` to ``apply``); at init, if that stream
        is absent too, the mode is used.
      sample_posterior: sample z ~ q(z|x) (training) or use the mode.
    """
    posterior = self.encode(x)
    if sample_posterior:
      if rng is None and (self.has_rng("sample") or not self.is_initializing()):
        rng = self.make_rng("sample")
      z = posterior.sample(rng) if rng is not None else posterior.mode()
    else:
      z = posterior.mode()
    return self.decode(z), posterior


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator (Isola et al., "pix2pix", CVPR 2017; N-layer variant).

  4x4 conv stride 2 + LeakyReLU(0.2); then ``num_layers - 1`` blocks of 4x4
  conv stride 2 + norm + LeakyReLU with widths ``base_width * min(2**n, 8)``;
  a 4x4 stride-1 conv + norm + LeakyReLU; a 4x4 stride-1 conv to one logit
  per patch. All convs pad by 1, so an H x W input gives a
  (H/2**num_layers - 2) x (W/2**num_layers - 2) logit map (e.g. 256 -> 30,
  32 -> 2 with 3 layers). Weights are N(0, 0.02) as in pix2pix.

  Attributes:
    base_width: width of the first conv (64 in pix2pix).
    num_layers: number of stride-2 convs.
    norm: "group" or "none" (BatchNorm is not offered: it would need mutable
      state and a train flag in the adversarial step).
    dtype: compute dtype; parameters and logits are float32.

  ``__call__(x) -> logits (B, h, w, 1)`` float32.
  """
  base_width: int = 64
  num_layers: int = 3
  norm: str = "group"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.norm not in ("group", "none"):
      raise ValueError(f"PatchDiscriminator norm must be 'group' or 'none', got {self.norm!r}")
    min_size = 2 ** self.num_layers * 3
    if x.ndim != 4 or min(x.shape[1:3]) < min_size:
      raise ValueError(f"PatchDiscriminator with num_layers={self.num_layers} needs NHWC "
                       f"images of at least {min_size} px, got shape {x.shape}")

    def conv(width: int, stride: int, name: str, bias: bool = True) -> nn.Conv:
      return nn.Conv(width, (4, 4), (stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(0.02), name=name)

    h = nn.leaky_relu(conv(self.base_width, 2, "conv0")(x.astype(self.dtype)), 0.2)
    for n in range(1, self.num_layers + 1):
      width = self.base_width * min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      h = conv(width, stride, f"conv{n}", bias=self.norm == "none")(h)
      h = make_norm(self.norm, h, False, name=f"norm{n}", dtype=self.dtype)
      h = nn.leaky_relu(h, 0.2)
    logits = conv(1, 1, "logits")(h)
    return logits.astype(jnp.float32)


_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-test size: f = 4 like the paper, one ResBlock per level, no attention.
    "tiny": dict(latent_channels=3, base_width=16, channel_mult=(1, 2, 4),
                 num_res_blocks=1, attn_mid=False),
    # Laptop/single-GPU size.
    "small": dict(latent_channels=3, base_width=64, channel_mult=(1, 2, 4),
                  num_res_blocks=2, attn_mid=True),
    # Rombach et al. 2022 KL-f4 (c = 3), as used by DCL-CsTP Stage 1 (256 -> 64).
    "paper": dict(latent_channels=3, base_width=128, channel_mult=(1, 2, 4),
                  num_res_blocks=2, attn_mid=True),
}


def vae_config(size: str = "paper") -> dict[str, Any]:
  """``AutoencoderKL`` keyword arguments (all but ``in_channels``/``dtype``) by size.

  Raises:
    ValueError: unknown size (the message lists the valid ones).
  """
  if size not in _PRESETS:
    raise ValueError(f"unknown VAE size {size!r}; valid sizes: {sorted(_PRESETS)}")
  return dict(_PRESETS[size])
