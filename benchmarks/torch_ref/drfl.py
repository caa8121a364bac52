"""PyTorch reference of the DRFL network and its train step (Xu et al., EAAI 2023).

Written from the paper (Sec. 3, Fig. 2-4, eq. 1-15) in the reading of
``shared/specs/drfl.md``, with the layer layout of ``medrep_jax.models.drfl`` so both
have the same parameters (names, shapes, count) and compute the same function:

* encoder: Conv4x4/s2 stem + LeakyReLU(0.2), then per level [PFAM block, Conv4x4/s2,
  GroupNorm, LeakyReLU(0.2)] (Sec. 3.1, strided convs instead of pooling);
* two decoders (segmentation, SR; one shared with ``share_decoder``): per level [PFAM
  block, ConvT4x4/s2, GroupNorm, PReLU, dropout 0.5 on the first], U-Net skip concat;
* PFAM (Sec. 3.3, Fig. 4): two 3x3 convs with BatchNorm, CBAM channel attention, the
  peakiness spatial attention (eq. 14-15), residual ReLU;
* RFTM (Sec. 3.2, eq. 8-13): RFTL_seg(F_seg), RFTL_sr(F_sr), then RFTL_fusion with queries
  from H_sr and keys/values from H_seg (eq. 8); an RFTL is patch embedding + position
  embedding (eq. 10), pre-LN WMAL (Q, K, V gated by sigmoid(g)) and MLP layers (eq.
  11-12), a final LayerNorm, a linear un-embedding back to the map, plus the dilated
  residual (3x3 convs at rates 6 and 12, eq. 13); output Concat(H_fusion * F_sr, F_seg);
* heads: p_bin = ConvT4x4/s2(Concat(RFTM, e_0)) (eq. 9); p_sr = sigmoid(ConvT4x4/s2(
  UpLayer(Concat(F_sr, e_0)))) at 2x; the Fusion Module (Sec. 3.1.3) on
  Concat(sigmoid(p_bin), LeakyReLU(Conv4x4/s2(p_sr))) -> p_fusion;
* loss eq. 7: L = λ (L_sr + L_seg(p_bin)) + γ L_seg(p_fusion), L_seg = BCE + Dice (eq.
  1-3, 6), L_sr = L1 (eq. 4), λ = γ = 1; Adam.

Convolutions pad like XLA's "SAME" (asymmetric for a stride-2 3x3 conv) and the
transposed convolutions reproduce ``lax.conv_transpose(..., (2, 2), "SAME")``, so the
flax kernels load unchanged (``load_flax``). Tensors are NCHW. The train step draws the
same on-device augmentation as the JAX step (per-example flips and 90° rotations) and
computes the bicubic 2x SR target (``sr_target=bicubic``) with ``jax.image.resize``'s
weights.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref import flax_io
from benchmarks.torch_ref.unet import group_count, make_norm

LEAKY_SLOPE = 0.2
ATTENTIONS = ("none", "cbam", "pfam")
SR_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": lambda v: v}


# ---------------------------------------------------------------- layers


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
  """XLA's "SAME" padding (before, after) of one axis: the output is ceil(size / stride)."""
  span = (kernel - 1) * dilation + 1
  total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
  return total // 2, total - total // 2


class Conv(nn.Conv2d):
  """k x k convolution with "SAME" padding as flax's ``nn.Conv(padding="SAME")``."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
               bias: bool = True):
    super().__init__(cin, cout, kernel, stride=stride, dilation=dilation, bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
    (top, bottom), (left, right) = (same_pads(n, k, s, d) for n in x.shape[-2:])
    if top == bottom and left == right:
      return F.conv2d(x, self.weight, self.bias, s, (top, left), d)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, self.weight, self.bias, s, 0, d)


class ConvTranspose2x(nn.ConvTranspose2d):
  """``lax.conv_transpose(x, w, (2, 2), "SAME")``: a k x k stride-2 transposed conv to 2H.

  lax pads the zero-dilated input by (a, k + 2 - 2 - a), a = k - 1 if 2 > k - 1 else
  ceil(k / 2); torch's ``padding=p`` pads k - 1 - p on both sides, so p = k - 1 - a and
  the surplus rows/columns at the end (k = 3: one) are cropped. The weight is the flax
  kernel flipped and transposed to (in, out, kh, kw) (``flax_io``).
  """

  def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True):
    front = kernel - 1 if 2 > kernel - 1 else math.ceil(kernel / 2)
    super().__init__(cin, cout, kernel, stride=2, padding=kernel - 1 - front, bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return super().forward(x)[..., :2 * h, :2 * w]


class PReLU(nn.Module):
  """PReLU with one slope (init 0.25), named ``negative_slope`` as flax's ``nn.PReLU``."""

  def __init__(self, init: float = 0.25):
    super().__init__()
    self.negative_slope = nn.Parameter(torch.tensor(init))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, self.negative_slope.to(x.dtype) * x)


def group_norm(channels: int) -> nn.GroupNorm:
  """GroupNorm with the largest group count <= 32 dividing ``channels``, eps 1e-5."""
  return nn.GroupNorm(group_count(channels), channels, eps=1e-5)


def leaky(x: torch.Tensor) -> torch.Tensor:
  return F.leaky_relu(x, LEAKY_SLOPE)


def dropout(p: float) -> nn.Module:
  return nn.Dropout(p) if p > 0 else nn.Identity()


# ---------------------------------------------------------------- PFAM (Sec. 3.3)


class ChannelAttention(nn.Module):
  """CBAM channel attention: F * sigmoid(MLP(avgpool F) + MLP(maxpool F)), ratio 16."""

  def __init__(self, channels: int, ratio: int = 16):
    super().__init__()
    self.fc1 = nn.Linear(channels, max(channels // ratio, 1), bias=False)
    self.fc2 = nn.Linear(max(channels // ratio, 1), channels, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    mlp = lambda v: self.fc2(torch.relu(self.fc1(v)))
    m = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
    return x * m[:, :, None, None]


class SpatialAttention(nn.Module):
  """CBAM spatial attention: F * sigmoid(Conv7x7(Concat(mean_c F, max_c F)))."""

  def __init__(self, kernel: int = 7):
    super().__init__()
    self.conv = Conv(2, 1, kernel, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    return x * torch.sigmoid(self.conv(pooled))


class PeakSpatialAttention(nn.Module):
  """PFA: F_peak = F - avgpool(F) (eq. 14), F_spa = sigmoid(Conv(Concat(Conv(F_peak),
  avgpool(F)))) (eq. 15), out F * F_spa; avgpool is the mean over channels."""

  def __init__(self, channels: int, kernel: int = 3):
    super().__init__()
    self.peak_conv = Conv(channels, 1, kernel, bias=False)
    self.fuse_conv = Conv(2, 1, kernel, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    avg = x.mean(1, keepdim=True)
    peak = self.peak_conv(x - avg)                                       # eq. 14
    return x * torch.sigmoid(self.fuse_conv(torch.cat([peak, avg], 1)))  # eq. 15


class PFAMBlock(nn.Module):
  """The PFAM residual block (Fig. 4a): ReLU(x + PFA(CA(norm2(conv2(ReLU(norm1(conv1 x))))))).

  ``attention`` "cbam" swaps PFA for CBAM's spatial attention, "none" drops both (Table
  7). The width is kept, so there is no shortcut conv (as in the DRFL network).
  """

  def __init__(self, channels: int, attention: str = "pfam", norm: str = "batch"):
    super().__init__()
    if attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    bias = norm == "none"
    self.conv1 = Conv(channels, channels, 3, bias=bias)
    self.norm1 = make_norm(norm, channels)
    self.conv2 = Conv(channels, channels, 3, bias=bias)
    self.norm2 = make_norm(norm, channels)
    if attention != "none":
      self.channel = ChannelAttention(channels)
    if attention == "pfam":
      self.pfa = PeakSpatialAttention(channels)
    elif attention == "cbam":
      self.spatial = SpatialAttention()
    self.attention = attention

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
    if self.attention != "none":
      y = self.channel(y)
      y = self.pfa(y) if self.attention == "pfam" else self.spatial(y)
    return torch.relu(x + y)


# ---------------------------------------------------------------- encoder / decoders (Sec. 3.1)


class DownLayer(nn.Module):
  """Encoder level: PFAM block, Conv4x4/s2, GroupNorm, LeakyReLU(0.2)."""

  def __init__(self, cin: int, cout: int, attention: str, norm: str):
    super().__init__()
    self.block = PFAMBlock(cin, attention, norm)
    self.down = Conv(cin, cout, 4, stride=2, bias=False)
    self.norm = group_norm(cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return leaky(self.norm(self.down(self.block(x))))


class UpLayer(nn.Module):
  """Decoder level: PFAM block, ConvT4x4/s2, GroupNorm, PReLU, dropout."""

  def __init__(self, cin: int, cout: int, attention: str, norm: str, drop: float = 0.0):
    super().__init__()
    self.block = PFAMBlock(cin, attention, norm)
    self.up = ConvTranspose2x(cin, cout, 4, bias=False)
    self.norm = group_norm(cout)
    self.act = PReLU()
    self.drop = dropout(drop)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.drop(self.act(self.norm(self.up(self.block(x)))))


class Encoder(nn.Module):
  """The shared encoder: e_0 = LeakyReLU(stem(x)), e_i = level_i(e_{i-1}); returns [e_0..]."""

  def __init__(self, in_channels: int, widths: Sequence[int], attention: str, norm: str):
    super().__init__()
    self.stem = Conv(in_channels, widths[0], 4, stride=2, bias=False)
    self.levels = len(widths)
    for i in range(1, len(widths)):
      self.add_module(f"level{i}", DownLayer(widths[i - 1], widths[i], attention, norm))

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    feats = [leaky(self.stem(x))]
    for i in range(1, self.levels):
      feats.append(getattr(self, f"level{i}")(feats[-1]))
    return feats


class Decoder(nn.Module):
  """One stream's decoder: deep to shallow, upsample to e_{i-1}'s width, concat the skip
  (not e_0, which the heads concatenate); dropout on the first level."""

  def __init__(self, widths: Sequence[int], attention: str, norm: str, drop: float):
    super().__init__()
    n = len(widths)
    cin = widths[-1]
    for j, i in enumerate(range(n - 1, 0, -1)):
      self.add_module(f"level{j}", UpLayer(cin, widths[i - 1], attention, norm,
                                           drop if j == 0 else 0.0))
      cin = widths[i - 1] + (widths[i - 1] if i > 1 else 0)
    self.n = n

  def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    x = feats[-1]
    for j, i in enumerate(range(self.n - 1, 0, -1)):
      x = getattr(self, f"level{j}")(x)
      if i > 1:
        x = torch.cat([x, feats[i - 1]], 1)
    return x


# ---------------------------------------------------------------- RFTM (Sec. 3.2)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
  """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), each patch flattened (y, x, c) as in JAX."""
  b, c, h, w = x.shape
  x = x.permute(0, 2, 3, 1).reshape(b, h // patch, patch, w // patch, patch, c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), -1)


def unpatchify(tokens: torch.Tensor, patch: int, hw: tuple[int, int]) -> torch.Tensor:
  """Inverse of ``patchify``: (B, N, p*p*C) -> (B, C, H, W)."""
  b, _, d = tokens.shape
  h, w = hw
  c = d // (patch * patch)
  x = tokens.reshape(b, h // patch, w // patch, patch, patch, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


class WMAL(nn.Module):
  """Weighted multi-head attention layer: Q, K, V scaled by sigmoid(g_q), sigmoid(g_k),
  sigmoid(g_v) (learnable g, init 0.1), softmax(Q K^T / sqrt(d_h)) V, output projection.

  ``key_source`` "context": K and V from the context (eq. 8); "query": K from the queries.
  """

  def __init__(self, dim: int, heads: int, gate_init: float = 0.1, train_gates: bool = True,
               key_source: str = "context"):
    super().__init__()
    if dim % heads:
      raise ValueError(f"WMAL: {dim} channels not divisible by {heads} heads")
    self.heads, self.key_source, self.gate_init = heads, key_source, gate_init
    self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
    if train_gates:
      for n in "qkv":
        setattr(self, f"gate_{n}", nn.Parameter(torch.tensor(float(gate_init))))

  def _gate(self, n: str) -> torch.Tensor | float:
    g = getattr(self, f"gate_{n}", None)
    return torch.sigmoid(g) if g is not None else 1.0 / (1.0 + math.exp(-self.gate_init))

  def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    b, n, d = x.shape
    src = x if context is None else context
    split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
    q = split(self.query(x) * self._gate("q"))
    k = split(self.key(x if self.key_source == "query" else src) * self._gate("k"))
    v = split(self.value(src) * self._gate("v"))
    o = F.scaled_dot_product_attention(q, k, v)
    return self.out(o.transpose(1, 2).reshape(b, n, d))


class TokenMLP(nn.Module):
  """Dense - GELU (exact) - dropout - Dense - dropout."""

  def __init__(self, dim: int, hidden: int, drop: float):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    self.drop = dropout(drop)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DilatedResidual(nn.Module):
  """Dilated(F_in) of eq. 13: the sum of k x k convs (with bias) at each dilation rate."""

  def __init__(self, channels: int, dilations: Sequence[int], kernel: int = 3):
    super().__init__()
    self.rates = tuple(int(r) for r in dilations)
    for r in self.rates:
      self.add_module(f"dilated{r}", Conv(channels, channels, kernel, dilation=r))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for r in self.rates:
      out = out + getattr(self, f"dilated{r}")(x)
    return out


class RFTL(nn.Module):
  """Representation Fusion Transformer Layer (eq. 10-13) over a (C, H, W) map.

    Z_0 = patches E + E_pos (10); Z' = WMAL(LN Z) + Z (11); Z = MLP(LN Z') + Z' (12);
    F_out = unpatchify(Linear(LN Z_L)) + Dilated(F_in) (13)

  With ``cross``, every layer attends from these tokens to a context map's tokens
  (its own embedding, "context_embed" / "context_pos_embed", and LayerNorm per layer).
  """

  def __init__(self, channels: int, hw: tuple[int, int], *, hidden: int, heads: int,
               mlp_dim: int, num_layers: int, patch_size: int, dilations: Sequence[int],
               dilated_kernel: int, drop: float, gate_init: float, train_gates: bool,
               key_source: str = "context", cross: bool = False):
    super().__init__()
    p = patch_size
    tokens, width = (hw[0] // p) * (hw[1] // p), p * p * channels
    self.patch, self.num_layers, self.cross = p, num_layers, cross
    self.patch_embed = nn.Linear(width, hidden)
    self.patch_pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, hidden))
    if cross:
      self.context_embed = nn.Linear(width, hidden)
      self.context_pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, hidden))
    ln = lambda: nn.LayerNorm(hidden, eps=1e-6)
    for i in range(num_layers):
      if cross:
        self.add_module(f"norm_context{i}", ln())
      self.add_module(f"norm_attn{i}", ln())
      self.add_module(f"wmal{i}", WMAL(hidden, heads, gate_init, train_gates, key_source))
      self.add_module(f"norm_mlp{i}", ln())
      self.add_module(f"mlp{i}", TokenMLP(hidden, mlp_dim, drop))
    self.drop = dropout(drop)
    self.encoder_norm = ln()
    self.unembed = nn.Linear(hidden, width)
    self.dilated = DilatedResidual(channels, dilations, dilated_kernel)

  def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    z = self.patch_embed(patchify(x, self.patch)) + self.patch_pos_embed          # eq. 10
    ctx = None
    if self.cross:
      ctx = self.context_embed(patchify(context, self.patch)) + self.context_pos_embed
    for i in range(self.num_layers):
      layer = lambda name, i=i: getattr(self, f"{name}{i}")
      c = None if ctx is None else layer("norm_context")(ctx)
      z = z + self.drop(layer("wmal")(layer("norm_attn")(z), c))               # eq. 11
      z = z + layer("mlp")(layer("norm_mlp")(z))                               # eq. 12
    out = unpatchify(self.unembed(self.encoder_norm(z)), self.patch, x.shape[-2:])
    return out + self.dilated(x)                                                 # eq. 13


class RFTM(nn.Module):
  """RFTM (eq. 8-9): H_seg = RFTL(F_seg), H_sr = RFTL(F_sr), H_fusion = RFTL(H_sr | H_seg);
  returns Concat(H_fusion * F_sr, F_seg), the input of eq. 9's conv."""

  def __init__(self, channels: int, hw: tuple[int, int], cross_keys: str = "seg",
               **rftl: Any):
    super().__init__()
    self.rftl_seg = RFTL(channels, hw, **rftl)
    self.rftl_sr = RFTL(channels, hw, **rftl)
    self.rftl_fusion = RFTL(channels, hw, cross=True,
                            key_source="context" if cross_keys == "seg" else "query", **rftl)

  def forward(self, f_seg: torch.Tensor, f_sr: torch.Tensor) -> torch.Tensor:
    h_fusion = self.rftl_fusion(self.rftl_sr(f_sr), self.rftl_seg(f_seg))     # eq. 8
    return torch.cat([h_fusion * f_sr, f_seg], 1)                            # eq. 9 input


# ---------------------------------------------------------------- Fusion Module (Sec. 3.1.3)


class FusionModule(nn.Module):
  """A small U-Net on Concat(sigmoid(p_bin), LeakyReLU(Conv4x4/s2(p_sr))): ``levels`` x
  [Conv3x3/s2, GN, LeakyReLU] down, ``levels`` x [ConvT3x3/s2, GN, PReLU, skip concat] up
  (dropout after the first), Conv3x3 -> K logits."""

  def __init__(self, num_classes: int, sr_channels: int, width: int = 64, levels: int = 4,
               drop: float = 0.5):
    super().__init__()
    if width <= num_classes:
      raise ValueError(f"fusion width {width} must exceed num_classes {num_classes}")
    self.levels = levels
    self.sr_down = Conv(sr_channels, width - num_classes, 4, stride=2, bias=False)
    cin = width
    for i in range(levels):
      self.add_module(f"down{i}", Conv(cin, width, 3, stride=2, bias=False))
      self.add_module(f"down_norm{i}", group_norm(width))
      cin = width
    for i in reversed(range(levels)):
      self.add_module(f"up{i}", ConvTranspose2x(cin, width, 3, bias=False))
      self.add_module(f"up_norm{i}", group_norm(width))
      self.add_module(f"up_act{i}", PReLU())
      cin = 2 * width
    self.drop = dropout(drop)
    self.logits = Conv(cin, num_classes, 3)

  def forward(self, p_bin: torch.Tensor, p_sr: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(p_bin) if p_bin.shape[1] == 1 else torch.softmax(p_bin, 1)
    x = torch.cat([prob, leaky(self.sr_down(p_sr))], 1)
    skips = [x]
    for i in range(self.levels):
      x = leaky(getattr(self, f"down_norm{i}")(getattr(self, f"down{i}")(x)))
      skips.append(x)
    skips.pop()
    for i in reversed(range(self.levels)):
      part = lambda name, i=i: getattr(self, f"{name}{i}")
      x = part("up_act")(part("up_norm")(part("up")(x)))
      if i == self.levels - 1:
        x = self.drop(x)
      x = torch.cat([x, skips[i]], 1)
    return self.logits(x)


# ---------------------------------------------------------------- the network (Fig. 2)


class DRFL(nn.Module):
  """The dual-stream network: ``forward(x (B, C, H, W))`` -> {"p_bin" (B, K, H, W) logits,
  "p_sr" (B, C_sr, 2H, 2W), "p_fusion" (B, K, H, W) logits}, the streams that are on.

  Arguments are ``medrep_jax.models.drfl.DRFL``'s fields, plus ``in_channels`` and
  ``image_size`` (the RFTM's position embeddings have one entry per patch).
  """

  def __init__(self, in_channels: int, image_size: int, num_classes: int = 1,
               sr_channels: int = 0, widths: Sequence[int] = (64, 128, 256, 512, 512),
               attention: str = "pfam", norm: str = "batch", dropout: float = 0.5,
               sr_stream: bool = True, rftm: bool = True, fusion: bool = True,
               share_decoder: bool = False, hidden: int = 768, heads: int = 12,
               mlp_dim: int = 3072, num_layers: int = 12, patch_size: int = 16,
               dilations: Sequence[int] = (6, 12), dilated_kernel: int = 3,
               transformer_dropout: float = 0.1, gate_init: float = 0.1,
               train_gates: bool = True, cross_keys: str = "seg", fusion_width: int = 64,
               fusion_levels: int = 4, sr_activation: str = "sigmoid"):
    super().__init__()
    if (rftm or fusion) and not sr_stream:
      raise ValueError("DRFL: rftm and fusion need the SR stream")
    if sr_activation not in SR_ACTIVATIONS:
      raise ValueError(f"sr_activation must be one of {SR_ACTIVATIONS}, got {sr_activation!r}")
    widths = tuple(int(w) for w in widths)
    w0, sr_c = widths[0], sr_channels or in_channels
    self.sr_stream, self.share_decoder = sr_stream, share_decoder
    self.sr_activation = sr_activation
    self.encoder = Encoder(in_channels, widths, attention, norm)
    self.seg_decoder = Decoder(widths, attention, norm, dropout)
    if sr_stream and not share_decoder:
      self.sr_decoder = Decoder(widths, attention, norm, dropout)
    if rftm:
      half = (image_size // 2, image_size // 2)
      self.rftm = RFTM(w0, half, cross_keys, hidden=hidden, heads=heads, mlp_dim=mlp_dim,
                       num_layers=num_layers, patch_size=patch_size, dilations=dilations,
                       dilated_kernel=dilated_kernel, drop=transformer_dropout,
                       gate_init=gate_init, train_gates=train_gates)
    self.seg_head = ConvTranspose2x((2 if rftm else 1) * w0 + w0, num_classes, 4)  # eq. 9
    if sr_stream:
      self.sr_up = UpLayer(2 * w0, 2 * w0, attention, norm)
      self.sr_head = ConvTranspose2x(2 * w0, sr_c, 4)
    if fusion:
      self.fusion = FusionModule(num_classes, sr_c, fusion_width, fusion_levels, dropout)

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    feats = self.encoder(x)
    e0 = feats[0]
    f_seg = self.seg_decoder(feats)
    head = f_seg
    out = {}
    if self.sr_stream:
      f_sr = (self.seg_decoder if self.share_decoder else self.sr_decoder)(feats)
    if hasattr(self, "rftm"):
      head = self.rftm(f_seg, f_sr)
    out["p_bin"] = self.seg_head(torch.cat([head, e0], 1))                          # eq. 9
    if self.sr_stream:
      y = self.sr_head(self.sr_up(torch.cat([f_sr, e0], 1)))
      out["p_sr"] = SR_ACTIVATIONS[self.sr_activation](y)
    if hasattr(self, "fusion"):
      out["p_fusion"] = self.fusion(out["p_bin"], out["p_sr"])
    return out


def drfl_from_config(config: Any, in_channels: int = 1, num_classes: int = 1) -> DRFL:
  """The torch DRFL of a ``configs/drfl.py`` config (``model.arch=drfl``)."""
  m = config.model
  if m.arch != "drfl":
    raise ValueError(f"the torch reference implements model.arch=drfl, got {m.arch!r}")
  names = set(inspect.signature(DRFL).parameters) - {"in_channels", "image_size",
                                                      "num_classes"}
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in m.items()
            if k in names}
  return DRFL(in_channels, int(config.data.image_size), num_classes, **fields)


def count_params(model: nn.Module) -> int:
  """Number of trainable scalars."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_flax(model: nn.Module, params: Mapping[str, Any],
              batch_stats: Mapping[str, Any] | None = None) -> None:
  """Copies a flax ``DRFL``'s variables into ``model`` by name (``flax_io``'s layouts).

  Conv / transposed conv / linear / norm tensors go through ``flax_io``; the leaves that
  carry their flax name in torch (PReLU ``negative_slope``, WMAL ``gate_q/k/v``, RFTL
  ``*_pos_embed``) are copied as they are.

  Raises:
    KeyError: a torch tensor has no flax counterpart.
  """
  flax_io.load_flax(model, params, batch_stats, named_leaves=True)


# ---------------------------------------------------------------- loss (eq. 1-7)


def seg_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
  """L_seg (eq. 1) = pixel-mean BCE (eq. 2; softmax CE for K > 1) + soft Dice (eq. 3,
  smooth 1, per example and class, averaged)."""
  logits = logits.float()
  k = logits.shape[1]
  if k == 1:
    target = mask.float()[:, None]
    ce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
  else:
    target = F.one_hot(mask.long(), k).permute(0, 3, 1, 2).float()
    ce = F.cross_entropy(logits, mask.long())
    prob = torch.softmax(logits, 1)
  inter = (prob * target).sum((2, 3))
  dice = (2 * inter + smooth) / (prob.sum((2, 3)) + target.sum((2, 3)) + smooth)
  return ce + (1 - dice.mean(1)).mean()


def drfl_loss(outputs: Mapping[str, torch.Tensor], mask: torch.Tensor,
              sr_target: torch.Tensor | None, lam: float = 1.0, gamma: float = 1.0,
              seg_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """L = λ (L_sr + w L_seg(p_bin)) + γ w L_seg(p_fusion) (eq. 5-7; L_sr = mean |p_sr - g|,
  eq. 4); returns (L, the unweighted terms present)."""
  terms = {"loss_seg": seg_loss(outputs["p_bin"], mask)}
  dfm = seg_weight * terms["loss_seg"]
  if "p_sr" in outputs:
    terms["loss_sr"] = (outputs["p_sr"].float() - sr_target).abs().mean()
    dfm = dfm + terms["loss_sr"]
  loss = lam * dfm
  if "p_fusion" in outputs:
    terms["loss_fusion"] = seg_loss(outputs["p_fusion"], mask)
    loss = loss + gamma * seg_weight * terms["loss_fusion"]
  return loss, terms


# ---------------------------------------------------------------- SR target and augmentation


def keys_cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (``jax.image.resize``'s "bicubic")."""
  x = np.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return np.where(x >= 2.0, 0.0, np.where(x >= 1.0, far, near))


def bicubic_matrix(size: int, factor: int = 2) -> np.ndarray:
  """(factor * size, size) weights of a bicubic upsampling along one axis, with
  ``jax.image.resize``'s half-pixel centres and weights renormalized at the borders."""
  sample = (np.arange(factor * size) + 0.5) / factor - 0.5
  w = keys_cubic(sample[:, None] - np.arange(size)[None, :])
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def bicubic_2x(images: torch.Tensor) -> torch.Tensor:
  """The ``sr_target=bicubic`` SR target: bicubic 2x of (B, C, H, W), clipped to [0, 1]."""
  h, w = images.shape[-2:]
  a_h = torch.from_numpy(bicubic_matrix(h)).to(images.device)
  a_w = a_h if w == h else torch.from_numpy(bicubic_matrix(w)).to(images.device)
  return (a_h @ images.float() @ a_w.T).clamp(0.0, 1.0)


def flip_rotate(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """Per example, the same random h-flip, v-flip and 90° rotation (square maps) of the image
  (B, C, H, W) and the mask (B, H, W), as ``drfl_parts.common.flip_rotate``."""
  b, dev = image.shape[0], image.device
  hflip, vflip = (torch.rand(b, device=dev) < 0.5 for _ in range(2))
  k = torch.randint(0, 4 if image.shape[-1] == image.shape[-2] else 1, (b,), device=dev)
  out = []
  for x in (image, mask):
    view = (-1,) + (1,) * (x.ndim - 1)
    x = torch.where(hflip.view(view), x.flip(-1), x)
    x = torch.where(vflip.view(view), x.flip(-2), x)
    rotations = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
    out.append(rotations[k, torch.arange(b, device=dev)])
  return out[0], out[1]


# ---------------------------------------------------------------- the train step


class DRFLTrainStep:
  """One DRFL update: augment, bicubic SR target, forward, eq. 7, backward, Adam.

  Args:
    model: the ``DRFL`` network.
    config: the ``configs/drfl.py`` config (``optim.lr``, ``optim.b1``, ``loss``,
      ``augment`` are read; the JAX schedule holds ``lr`` for its first half).
    amp: bf16 autocast for the network (the losses stay float32).
    channels_last: channels-last memory format for the network and inputs.
    compile: ``torch.compile`` the network.
  """

  # pylint: disable-next=redefined-builtin
  def __init__(self, model: DRFL, config: Any, *, amp: bool = False,
               channels_last: bool = False, compile: bool = False):
    self.model = model.train()
    if channels_last:
      self.model.to(memory_format=torch.channels_last)
    self.device = next(model.parameters()).device
    self.amp, self.channels_last = amp, channels_last
    self.augment = bool(config.augment)
    l, o = config.loss, config.optim
    self.lam, self.gamma, self.seg_weight = float(l.lam), float(l.gamma), float(l.seg_weight)
    kw = dict(lr=float(o.lr), betas=(float(o.get("b1", 0.9)), 0.999), eps=1e-8)
    try:
      self.optimizer = torch.optim.Adam(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):
      self.optimizer = torch.optim.Adam(model.parameters(), foreach=True, **kw)
    self.net = torch.compile(model) if compile else model

  def _autocast(self):
    if not self.amp:
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=torch.bfloat16)

  def losses(self, image: torch.Tensor, mask: torch.Tensor,
             sr_target: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(L, terms, outputs) of eq. 7 on ``image`` (B, C, H, W) and ``mask`` (B, H, W);
    ``sr_target`` defaults to the bicubic 2x of ``image``."""
    if sr_target is None:
      sr_target = bicubic_2x(image)
    x = image.contiguous(memory_format=torch.channels_last) if self.channels_last else image
    with self._autocast():
      outputs = self.net(x)
    outputs = {k: v.float() for k, v in outputs.items()}
    loss, terms = drfl_loss(outputs, mask, sr_target, self.lam, self.gamma, self.seg_weight)
    return loss, terms, outputs

  def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One update on a batch; returns the (detached) loss."""
    if self.augment:
      image, mask = flip_rotate(image, mask)
    self.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = self.losses(image, mask)
    loss.backward()
    self.optimizer.step()
    return loss.detach()
