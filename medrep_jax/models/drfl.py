"""The DRFL network (Xu et al., EAAI 2023, Sec. 3.1, Fig. 2) and a small SR teacher.

``DRFL(...)(x, train) -> {"p_bin", "p_sr", "p_fusion"}``:

  encoder     stem Conv4x4/s2 (w_0) + LeakyReLU(0.2), then per level i >= 1
              [PFAMBlock(w_{i-1}), Conv4x4/s2 (w_i), GroupNorm, LeakyReLU(0.2)]
              ("strided convolution instead of the down-sampling layer"): features
              e_0 .. e_{n-1} at strides 2 .. 2^n, n = len(widths).
  decoder     per level, deep to shallow: [PFAMBlock, ConvT4x4/s2 (w_{i-1}), GroupNorm,
              PReLU, Dropout(0.5) on the first only], then the U-Net skip concat with
              e_{i-1} (except e_0), ending at F (B, H/2, W/2, w_0): F_seg, F_sr.
  seg head    p_bin = ConvT4x4/s2(Concat(RFTM(F_seg, F_sr), e_0))  (eq. 9; without the
              RFTM, Concat(F_seg, e_0)): logits (B, H, W, K).
  SR stream   the same decoder (own weights unless ``share_decoder``) and the "additional
              upsampling module": Concat(F_sr, e_0) -> [PFAMBlock, ConvT4x4/s2 (2 w_0),
              GroupNorm, PReLU] -> ConvT4x4/s2 (C) -> p_sr (B, 2H, 2W, C).
  fusion      ``FusionModule`` on Concat(sigmoid(p_bin), Down(p_sr)) -> p_fusion logits.

This follows the layer layout of the authors' code (Softnet in model/DCL.py, as
``shared/specs/drfl.md`` describes it); the RFTM and the Fusion Module follow the paper
(see ``models/rftm.py`` and ``FusionModule``). The code's GroupNorm has one group per
channel; here it is ``resnet.make_norm("group")`` (at most 32 groups). The code calls the
segmentation decoder's modules for the SR stream too (shared weights, only the dropout
draw differs): ``share_decoder=True``; Fig. 2 draws two decoders (default).

p_sr's activation: the paper's SR targets are images in [0, 1] (the teacher's output on
the original image, Sec. 3.1.2), so p_sr is a sigmoid (``sr_activation="sigmoid"``). The
authors' code also ends in a sigmoid but normalizes the SR targets to [-1, 1], which the
sigmoid cannot reach; ``sr_activation="tanh"`` suits [-1, 1] targets and ``"none"``
returns the raw output.

Ablations (Tables 5-8) are switches: ``sr_stream=False`` is "SS" (segmentation stream
only: p_bin alone), ``sr_stream`` alone "SS+SRS", ``fusion`` "DFM", ``rftm`` "+RFTM",
``attention="cbam"`` "+CBAM" and ``attention="pfam"`` DRFL. The RFTM and the Fusion
Module need the SR stream (a ValueError otherwise).

Dropout (the decoder's 0.5, the fusion module's and the transformer's) is active when
``train=True`` and then needs a ``"dropout"`` rng. With ``norm="batch"`` (the PFAM
blocks' BatchNorm, as the code's BasicBlock) training updates ``batch_stats``
(``mutable=["batch_stats"]``). Parameters are float32, convolutions run in ``dtype``,
every output is float32.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medrep_jax.models.attention_blocks import PFAMBlock, conv
from medrep_jax.models.conv_transpose import ConvTranspose2x
from medrep_jax.models.resnet import Dtype, Features, make_norm
from medrep_jax.models.rftm import RFTM

SR_ACTIVATIONS = ("sigmoid", "tanh", "none")


def _conv_t(features: int, kernel: int, dtype: Dtype, name: str,
            use_bias: bool = False) -> ConvTranspose2x:
  """k x k stride-2 transposed conv, "SAME": exactly doubles H and W."""
  return ConvTranspose2x(features, kernel, use_bias=use_bias, dtype=dtype, name=name)


def _prelu(x: jnp.ndarray, name: str) -> jnp.ndarray:
  return nn.PReLU(negative_slope_init=0.25, name=name)(x)


class DownLayer(nn.Module):
  """Encoder level: PFAMBlock, Conv4x4/s2 to ``features``, GroupNorm, LeakyReLU(0.2)."""
  features: int
  attention: str = "pfam"
  norm: str = "batch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = PFAMBlock(attention=self.attention, norm=self.norm, dtype=self.dtype,
                  name="block")(x, train)
    x = conv(self.features, 4, self.dtype, "down", stride=2, use_bias=False)(x)
    x = make_norm("group", x, train, name="norm", dtype=self.dtype)
    return nn.leaky_relu(x, 0.2)


class UpLayer(nn.Module):
  """Decoder level: PFAMBlock, ConvT4x4/s2 to ``features``, GroupNorm, PReLU, dropout."""
  features: int
  attention: str = "pfam"
  norm: str = "batch"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = PFAMBlock(attention=self.attention, norm=self.norm, dtype=self.dtype,
                  name="block")(x, train)
    x = _conv_t(self.features, 4, self.dtype, "up")(x)
    x = _prelu(make_norm("group", x, train, name="norm", dtype=self.dtype), "act")
    return nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(x)


class DRFLEncoder(nn.Module):
  """The shared encoder (Sec. 3.1): strided convs, a PFAM block in every level.

  Returns the project's features dict: ``"c1"`` = e_0 (stride 2, w_0) .. ``"cN"`` =
  e_{N-1} (stride 2^N, w_{N-1}) and ``"pooled"`` (GAP of cN), N = len(widths).
  """
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  attention: str = "pfam"
  norm: str = "batch"
  dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.widths[-1]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> Features:
    x = conv(self.widths[0], 4, self.dtype, "stem", stride=2, use_bias=False)(
        x.astype(self.dtype))
    x = nn.leaky_relu(x, 0.2)
    feats = {"c1": x}
    for i, w in enumerate(self.widths[1:], start=1):
      x = DownLayer(w, self.attention, self.norm, self.dtype, name=f"level{i}")(x, train)
      feats[f"c{i + 1}"] = x
    feats["pooled"] = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    return feats


class DRFLDecoder(nn.Module):
  """One stream's decoder (Fig. 2): ``UpLayer``s with skips, to F (H/2, W/2, w_0).

  Level j (deep to shallow) upsamples to e_{N-1-j}'s grid and width; its output is
  concatenated with that skip, except the last (e_0), which the heads concatenate.
  The first level has dropout ``dropout`` (0.5).
  """
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  attention: str = "pfam"
  norm: str = "batch"
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Features, train: bool) -> jnp.ndarray:
    n = len(self.widths)
    x = feats[f"c{n}"]
    for j, i in enumerate(range(n - 1, 0, -1)):
      x = UpLayer(self.widths[i - 1], self.attention, self.norm,
                  self.dropout if j == 0 else 0.0, self.dtype, name=f"level{j}")(x, train)
      if i > 1:
        x = jnp.concatenate([x, feats[f"c{i}"].astype(self.dtype)], -1)
    return x


class FusionModule(nn.Module):
  """The Fusion Module (Sec. 3.1.3): a small U-Net on Concat(p_bin, p_sr) -> p_fusion.

    x_0  = Concat(sigmoid(p_bin), LeakyReLU(Conv4x4/s2(p_sr)))     width channels at H
    down: ``levels`` x [Conv3x3/s2, GroupNorm, LeakyReLU(0.2)]
    up:   ``levels`` x [ConvT3x3/s2, GroupNorm, PReLU, skip concat], dropout on the first
          (the middle of the U)
    p_fusion = Conv3x3(.) -> K logits at H

  "Each layer had only 64 filters with a size of 3x3" and "a dropout in the middle
  layer" (the paper); p_sr (2H) enters through a learned 4x4 stride-2 conv to
  ``width - K`` channels, as in the authors' code, so the input has ``width`` channels.
  p_bin enters as a probability (sigmoid; softmax for K > 1). The code's fusion levels
  also hold PFAM blocks; the paper's "simpler" module has plain convs, as here.
  Needs H divisible by 2^levels.
  """
  width: int = 64
  levels: int = 4
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, p_bin: jnp.ndarray, p_sr: jnp.ndarray, train: bool) -> jnp.ndarray:
    k = p_bin.shape[-1]
    if self.width <= k:
      raise ValueError(f"fusion width {self.width} must exceed num_classes {k}")
    prob = jax.nn.sigmoid(p_bin) if k == 1 else jax.nn.softmax(p_bin, -1)
    sr = conv(self.width - k, 4, self.dtype, "sr_down", stride=2, use_bias=False)(
        p_sr.astype(self.dtype))
    x = jnp.concatenate([prob.astype(self.dtype), nn.leaky_relu(sr, 0.2)], -1)
    skips = [x]
    for i in range(self.levels):
      x = conv(self.width, 3, self.dtype, f"down{i}", stride=2, use_bias=False)(x)
      x = nn.leaky_relu(make_norm("group", x, train, name=f"down_norm{i}",
                                  dtype=self.dtype), 0.2)
      skips.append(x)
    skips.pop()
    for i in reversed(range(self.levels)):
      x = _conv_t(self.width, 3, self.dtype, f"up{i}")(x)
      x = _prelu(make_norm("group", x, train, name=f"up_norm{i}", dtype=self.dtype),
                 f"up_act{i}")
      if i == self.levels - 1:
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(x)
      x = jnp.concatenate([x, skips[i]], -1)
    return conv(k, 3, self.dtype, "logits")(x).astype(jnp.float32)


class DRFL(nn.Module):
  """Dual-stream Representation Fusion Learning network (Fig. 2; see the module doc).

  Attributes:
    num_classes: K, p_bin / p_fusion logit channels (1: binary masks, sigmoid).
    sr_channels: p_sr channels C (0: the input's channels).
    widths: encoder widths w_0..w_{N-1} (paper/code 64-128-256-512-512); the input is
      downsampled N times, so H and W must be multiples of 2^N.
    attention: PFAM blocks' kind, "none" | "cbam" | "pfam" (Table 7).
    norm: the PFAM blocks' norm, "batch" (code) | "group" | "none".
    dropout: dropout of the first decoder level and the fusion module's middle (0.5).
    sr_stream: the SR stream (False: "SS", p_bin only).
    rftm: the RFTM between the streams (eq. 8-9).
    fusion: the Fusion Module (p_fusion).
    share_decoder: one decoder's weights for both streams (the authors' code).
    hidden, heads, mlp_dim, num_layers, patch_size: RFTL sizes (D = 768, 12 heads, MLP
      3072, 12 layers, patch 16 on the H/2 map: 64 tokens at 256 px).
    dilations, dilated_kernel: RFTL residual (rates 6 and 12, 3x3; 1 = code).
    transformer_dropout: RFTL MLP/attention-output dropout (ViT-B: 0.1).
    gate_init, train_gates, cross_keys: WMAL gates and cross-attention keys (rftm.py).
    fusion_width, fusion_levels: Fusion Module (64 filters, 4 levels as the code).
    sr_activation: "sigmoid" (targets in [0, 1]) | "tanh" | "none".
    dtype: compute dtype (bfloat16 for mixed precision); parameters float32.
    implementation: passed to ``jax.nn.dot_product_attention``.

  ``__call__(x (B, H, W, C_in), train) -> dict``: "p_bin" (B, H, W, K) logits;
  "p_sr" (B, 2H, 2W, C) when ``sr_stream``; "p_fusion" (B, H, W, K) logits when
  ``fusion``; all float32. The WMAL attention weights are sown into "intermediates"
  when that collection is mutable.
  """
  num_classes: int = 1
  sr_channels: int = 0
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  attention: str = "pfam"
  norm: str = "batch"
  dropout: float = 0.5
  sr_stream: bool = True
  rftm: bool = True
  fusion: bool = True
  share_decoder: bool = False
  hidden: int = 768
  heads: int = 12
  mlp_dim: int = 3072
  num_layers: int = 12
  patch_size: int = 16
  dilations: Sequence[int] = (6, 12)
  dilated_kernel: int = 3
  transformer_dropout: float = 0.1
  gate_init: float = 0.1
  train_gates: bool = True
  cross_keys: str = "seg"
  fusion_width: int = 64
  fusion_levels: int = 4
  sr_activation: str = "sigmoid"
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  def check(self, shape: Sequence[int]) -> None:
    """Raises ValueError naming the field when the switches or the input shape don't fit."""
    if len(self.widths) < 2:
      raise ValueError(f"DRFL needs at least 2 widths, got widths={tuple(self.widths)}")
    if (self.rftm or self.fusion) and not self.sr_stream:
      raise ValueError("DRFL: rftm and fusion need the SR stream; got sr_stream=False "
                       f"with rftm={self.rftm}, fusion={self.fusion}")
    if self.sr_activation not in SR_ACTIVATIONS:
      raise ValueError(f"sr_activation must be one of {SR_ACTIVATIONS}, "
                       f"got {self.sr_activation!r}")
    if len(shape) != 4:
      raise ValueError(f"DRFL expects images (B, H, W, C), got shape {tuple(shape)}")
    h, w = shape[1:3]
    n = len(self.widths)
    if h % 2 ** n or w % 2 ** n:
      raise ValueError(f"DRFL with {n} widths downsamples 2^{n}x: the {h}x{w} input "
                       f"must be a multiple of {2 ** n}")
    if self.rftm and ((h // 2) % self.patch_size or (w // 2) % self.patch_size):
      raise ValueError(f"DRFL: patch_size={self.patch_size} does not divide the "
                       f"{h // 2}x{w // 2} map the RFTM sees at a {h}x{w} input")
    if self.fusion and (h % 2 ** self.fusion_levels or w % 2 ** self.fusion_levels):
      raise ValueError(f"DRFL: fusion_levels={self.fusion_levels} needs the {h}x{w} "
                       f"input to be a multiple of {2 ** self.fusion_levels}")

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> dict[str, jnp.ndarray]:
    self.check(x.shape)
    dec = lambda name: DRFLDecoder(tuple(self.widths), self.attention, self.norm,
                                   self.dropout, self.dtype, name=name)
    feats = DRFLEncoder(tuple(self.widths), self.attention, self.norm, self.dtype,
                        name="encoder")(x, train)
    e0 = feats["c1"].astype(self.dtype)
    seg_decoder = dec("seg_decoder")
    f_seg = seg_decoder(feats, train)
    out = {}
    if self.sr_stream:
      f_sr = (seg_decoder if self.share_decoder else dec("sr_decoder"))(feats, train)
    head = f_seg
    if self.rftm:
      head = RFTM(hidden=self.hidden, num_heads=self.heads, mlp_dim=self.mlp_dim,
                  num_layers=self.num_layers, patch_size=self.patch_size,
                  dilations=tuple(self.dilations), dilated_kernel=self.dilated_kernel,
                  dropout=self.transformer_dropout, gate_init=self.gate_init,
                  train_gates=self.train_gates, cross_keys=self.cross_keys,
                  dtype=self.dtype, implementation=self.implementation,
                  name="rftm")(f_seg, f_sr, train)
    head = jnp.concatenate([head, e0], -1)
    out["p_bin"] = _conv_t(self.num_classes, 4, self.dtype, "seg_head",
                           use_bias=True)(head).astype(jnp.float32)        # eq. 9
    if self.sr_stream:
      y = jnp.concatenate([f_sr, e0], -1)
      y = UpLayer(2 * self.widths[0], self.attention, self.norm, 0.0, self.dtype,
                  name="sr_up")(y, train)
      y = _conv_t(self.sr_channels or x.shape[-1], 4, self.dtype, "sr_head",
                  use_bias=True)(y).astype(jnp.float32)
      act = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "none": lambda v: v}
      out["p_sr"] = act[self.sr_activation](y)
    if self.fusion:
      out["p_fusion"] = FusionModule(self.fusion_width, self.fusion_levels, self.dropout,
                                     self.dtype, name="fusion")(
                                         out["p_bin"], out["p_sr"], train)
    return out


def pixel_shuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """Depth-to-space: (B, h, w, r*r*C) -> (B, r*h, r*w, C) (Shi et al., 2016)."""
  b, h, w, c = x.shape
  r = factor
  x = x.reshape(b, h, w, r, r, c // (r * r)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * r, w * r, c // (r * r))


class SRTeacher(nn.Module):
  """A small 2x super-resolution CNN: the teacher of DRFL's SR stream (Sec. 3.1.2).

  The paper trains WSISR (Li et al., 2021) on 1/2-downsampled images with the originals
  as targets and uses its outputs on the originals as the SR stream's targets. This
  teacher is a compact EDSR/ESPCN-style network in its place:

    y   = Conv3x3(features)(x)
    y   = y + Conv3x3(Blocks(y))       ``num_blocks`` residual blocks conv-ReLU-conv
    out = bicubic_2x(x) + PixelShuffle_2(Conv3x3(4 C)(y))

  The last conv is zero-initialized, so a fresh teacher is bicubic upsampling and
  training learns the residual detail. No normalization, so ``train`` is unused (kept
  for the common signature).

  ``__call__(x (B, h, w, C), train=False) -> (B, 2h, 2w, C)`` float32, unclipped.
  """
  features: int = 64
  num_blocks: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    b, h, w, c = x.shape
    base = jax.image.resize(x.astype(jnp.float32), (b, 2 * h, 2 * w, c), "bicubic")
    y = head = conv(self.features, 3, self.dtype, "head")(x.astype(self.dtype))
    for i in range(self.num_blocks):
      r = nn.relu(conv(self.features, 3, self.dtype, f"block{i}_conv1")(y))
      y = y + conv(self.features, 3, self.dtype, f"block{i}_conv2")(r)
    y = head + conv(self.features, 3, self.dtype, "body_out")(y)
    y = nn.Conv(4 * c, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.zeros, name="upsample")(y)
    return base + pixel_shuffle(y, 2).astype(jnp.float32)
