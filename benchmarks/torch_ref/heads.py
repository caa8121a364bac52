"""PyTorch projection heads of DCL-CsTP, shaped like ``medrep_jax.models.heads``.

* ``MLPHead``: Linear(no bias)-BN-ReLU-Linear, the MoCo-v2/SimCLR projector
  (on pooled features) and the SimSiam predictor h (on embeddings).
* ``CrossScaleTokenProjection`` with ``CrossScaleAttention``: written from
  the dual-stream paper (Sec. III-D, Fig. 4, eq. 7) in the reading DESIGN.md
  fixes: 1x1 input projection to width d; pre-LN blocks whose keys and values
  come from a fused multi-scale map (depth-wise 3x3 s1 "high", 5x5 s2 "low",
  low + dw3x3-s2(high), + dw3x3(z), 1x1 "fuse"), queries from the input
  tokens, scaled dot-product attention, a GELU MLP; then LayerNorm,
  mean-pooling over tokens and a linear head.

Submodules carry the flax names, so ``flax_io.load_flax`` copies JAX weights
in by path. LayerNorm eps is 1e-6 and BatchNorm eps 1e-5, as in JAX.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Module):
  """fc1 (no bias) - norm1 (BN) - ReLU - fc2; pools (B, C, H, W) inputs first."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
    super().__init__()
    self.fc1 = nn.Linear(in_dim, hidden_dim, bias=False)
    self.norm1 = nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1)
    self.fc2 = nn.Linear(hidden_dim, out_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4:
      x = x.mean(dim=(2, 3))
    return self.fc2(torch.relu(self.norm1(self.fc1(x))))


def _dw(channels: int, kernel: int, stride: int) -> nn.Conv2d:
  return nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels)


class CrossScaleAttention(nn.Module):
  """Eq. 7 with cross-scale keys/values; ``forward(x (B, H, W, d)) -> (B, H*W, d)``."""

  def __init__(self, dim: int, num_heads: int, cross_scale: bool = True):
    super().__init__()
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    self.heads, self.cross_scale = num_heads, cross_scale
    if cross_scale:
      self.dw_high, self.dw_low = _dw(dim, 3, 1), _dw(dim, 5, 2)
      self.dw_down, self.dw_refine = _dw(dim, 3, 2), _dw(dim, 3, 1)
      self.fuse = nn.Conv2d(dim, dim, 1)
    self.query = nn.Linear(dim, dim)
    self.key_value = nn.Linear(dim, 2 * dim)
    self.out = nn.Linear(dim, dim)

  def cross_scale_tokens(self, x: torch.Tensor) -> torch.Tensor:
    m = x.permute(0, 3, 1, 2)
    z = self.dw_low(m) + self.dw_down(self.dw_high(m))
    z = self.fuse(z + self.dw_refine(z))
    return z.flatten(2).transpose(1, 2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, h, w, d = x.shape
    tokens = x.reshape(b, h * w, d)
    src = self.cross_scale_tokens(x) if self.cross_scale else tokens
    q = self.query(tokens).view(b, h * w, self.heads, -1).transpose(1, 2)
    k, v = self.key_value(src).view(b, src.shape[1], 2, self.heads, -1).unbind(2)
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
    return self.out(o.transpose(1, 2).reshape(b, h * w, d))


class TokenMLP(nn.Module):
  """fc1 (d -> ratio d) - exact GELU - fc2."""

  def __init__(self, dim: int, ratio: int = 4):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, ratio * dim), nn.Linear(ratio * dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x)))


class CrossScaleBlock(nn.Module):
  """x + Attn(LN(x)), then x + MLP(LN(x)), on (B, H, W, d) maps."""

  def __init__(self, dim: int, num_heads: int, attention: str = "csa"):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    attn = CrossScaleAttention(dim, num_heads, cross_scale=attention == "csa")
    self.attn_name = "cross_scale_attention" if attention == "csa" else "self_attention"
    self.add_module(self.attn_name, attn)
    self.mlp = TokenMLP(dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + getattr(self, self.attn_name)(self.norm1(x)).view(x.shape)
    return x + self.mlp(self.norm2(x))


class CrossScaleTokenProjection(nn.Module):
  """T: input_proj (1x1) - block0 - norm - mean over tokens - head.

  ``forward(feature_map (B, C, H, W)) -> (B, out_dim)``.
  """

  def __init__(self, in_dim: int, embed_dim: int, out_dim: int, num_heads: int,
               attention: str = "csa"):
    super().__init__()
    self.input_proj = nn.Conv2d(in_dim, embed_dim, 1)
    self.block0 = CrossScaleBlock(embed_dim, num_heads, attention)
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, out_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.input_proj(x).permute(0, 2, 3, 1)
    x = self.norm(self.block0(x))
    return self.head(x.mean(dim=(1, 2)))
