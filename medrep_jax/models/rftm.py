"""DRFL's Representation Fusion Transformer Module (Xu et al., EAAI 2023, Sec. 3.2, Fig. 3).

* ``WeightedMultiHeadAttention`` (WMAL): multi-head scaled dot-product attention whose
  queries, keys and values are each scaled by a gate, sigmoid(g_q), sigmoid(g_k),
  sigmoid(g_v) ("learnable weights to query, key, and value").
* ``RFTL``, the Representation Fusion Transformer Layer (eq. 10-13):

    Z_0   = [x_p^1 E; ...; x_p^N E] + E_pos                      (10)
    Z_l'  = WMAL(LN(Z_{l-1})) + Z_{l-1}                          (11)
    Z_l   = MLP(LN(Z_l')) + Z_l'                                 (12)
    F_out = Reshape(Z_L) + Dilated(F_in)                         (13)

  x_p^i are the p x p patches of F_in flattened (``patchify``), E a linear map to D,
  E_pos a learned (N, D) embedding. Reshape is a linear map D -> p*p*C followed by
  ``unpatchify`` (the exact inverse of ``patchify``), so F_out has F_in's shape; the
  paper's literal reshape needs D = p*p*C', and the authors' code reinterprets the
  (B, N, D) memory as a (B, 3, 2N, 2N) map, which scrambles positions. Dilated(F_in) is
  the sum of parallel 3x3 convs with dilation rates 6 and 12 (C -> C). A final
  LayerNorm follows the L layers, as in ViT (and the code).
* ``RFTM`` (eq. 8-9): H_seg = RFTL(F_seg), H_sr = RFTL(F_sr) (self-attention, separate
  weights: the streams are "fed into the RFTL respectively"), then
  H_fusion = RFTL(H_seg, H_sr) with queries from H_sr and keys/values from H_seg (eq. 8),
  and returns Concat(H_fusion * F_sr, F_seg), the input of eq. 9's Conv (the Conv is
  the segmentation head of ``models.drfl.DRFL``).

Where the authors' code (model/DCL.py, as described in ``shared/specs/drfl.md``)
differs, the switches give the code's behaviour:

* gates: the code fixes g = 0.1 with ``requires_grad=False`` (a constant 0.525):
  ``train_gates=False``; the paper's learnable gates are ``train_gates=True``.
* keys: the code's cross-attention takes Q and K from the SR tokens and V from the
  segmentation tokens: ``cross_keys="sr"`` (paper, eq. 8: ``"seg"``).
* dilated residual: the code's "rate 6 and 12" convs are 1x1 (dilation has no effect):
  ``dilated_kernel=1``.

Not switched, only documented: the code shares one self-attention transformer between
the streams, keeps the token residual and the dilated path of the cross layer on the
segmentation side (here both are on the query side, H_sr, whose positions the attention
output is aligned to), and gives H_fusion one channel through a 1x1 conv (here it keeps
F_sr's C channels, an element-wise gate).

Parameters and LayerNorm statistics are float32; matmuls and convs run in ``dtype``;
attention logits and softmax are float32 (``attention.attention_weights``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models.attention import attend, head_layout
from medrep_jax.models.attention_blocks import conv
from medrep_jax.models.heads import TokenMLP, layer_norm
from medrep_jax.models.resnet import Dtype

CROSS_KEYS = ("seg", "sr")


def patchify(x: jnp.ndarray, patch: int) -> jnp.ndarray:
  """(B, H, W, C) -> (B, (H/p)(W/p), p*p*C): row-major patches, each flattened (y, x, c).

  Raises:
    ValueError: H or W is not a multiple of ``patch``.
  """
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"RFTL patch_size={patch} does not divide the {h}x{w} feature map")
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch),
                                               patch * patch * c)


def unpatchify(tokens: jnp.ndarray, patch: int, hw: tuple[int, int]) -> jnp.ndarray:
  """Inverse of ``patchify``: (B, (H/p)(W/p), p*p*C) -> (B, H, W, C)."""
  b, n, d = tokens.shape
  h, w = hw
  gh, gw = h // patch, w // patch
  c = d // (patch * patch)
  if gh * gw != n or c * patch * patch != d:
    raise ValueError(f"cannot unpatchify {tokens.shape} into a {h}x{w} map with "
                     f"patch_size={patch}")
  x = tokens.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


class WeightedMultiHeadAttention(nn.Module):
  """WMAL (DRFL Sec. 3.2): gated multi-head scaled dot-product attention.

    Q = sigmoid(g_q) W_q x,  K = sigmoid(g_k) W_k c,  V = sigmoid(g_v) W_v c
    out = W_o concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h

  c = x (self-attention) or ``context`` (cross-attention). The gates are scalars g
  (initialized to ``gate_init``) passed through a sigmoid, as in the authors' code.

  Attributes:
    num_heads: heads (the width must divide evenly).
    gate_init: initial g (0.1, so each gate starts at sigmoid(0.1) = 0.525).
    train_gates: True: g_q, g_k, g_v are parameters ("gate_q", ...; the paper's learnable
      weights); False: the constant sigmoid(gate_init) and no parameters (the code).
    key_source: "context" (K and V from the context) or "query" (K from ``x``, V from the
      context: the authors' cross-attention).
    dropout: dropout on the attention weights (ViT's attention_dropout_rate, 0).
    dtype: compute dtype; logits and softmax float32.
    implementation: passed to ``jax.nn.dot_product_attention``.

  ``__call__(x (B, Lq, D), context (B, Lk, D) | None, deterministic=True,
  return_attention=False)`` -> (B, Lq, D), plus the (B, heads, Lq, Lk) float32 weights
  (rows sum to 1) when ``return_attention``. The weights are also sown into
  ``"intermediates"`` (``attention_weights``) when that collection is mutable.
  """
  num_heads: int = 12
  gate_init: float = 0.1
  train_gates: bool = True
  key_source: str = "context"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  def gates(self) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """sigmoid(g_q), sigmoid(g_k), sigmoid(g_v), float32 scalars."""
    if not self.train_gates:
      g = nn.sigmoid(jnp.float32(self.gate_init))
      return g, g, g
    init = nn.initializers.constant(self.gate_init)
    return tuple(nn.sigmoid(self.param(f"gate_{n}", init, (), jnp.float32))
                 for n in "qkv")

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None,
               deterministic: bool = True, return_attention: bool = False):
    if self.key_source not in ("context", "query"):
      raise ValueError(f"key_source must be 'context' or 'query', got {self.key_source!r}")
    d = x.shape[-1]
    heads, dh = head_layout(d, self.num_heads, 0)
    x = x.astype(self.dtype)
    src = x if context is None else context.astype(self.dtype)
    if self.key_source == "query" and src.shape[1] != x.shape[1]:
      raise ValueError(f"key_source='query' takes K from the {x.shape[1]} query tokens and "
                       f"V from the {src.shape[1]} context tokens: the counts must match")
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=jnp.float32)
    g_q, g_k, g_v = (g.astype(self.dtype) for g in self.gates())
    q = dense((heads, dh), name="query")(x) * g_q
    k = dense((heads, dh), name="key")(x if self.key_source == "query" else src) * g_k
    v = dense((heads, dh), name="value")(src) * g_v
    o, weights = attend(self, q, k, v, implementation=self.implementation,
                        return_attention=return_attention, dropout=self.dropout,
                        deterministic=deterministic)
    o = dense(d, axis=(-2, -1), name="out")(o)
    return (o, weights) if return_attention else o


class DilatedResidual(nn.Module):
  """Dilated(F_in) of eq. 13: the sum of parallel k x k convs, one per dilation rate.

  Attributes:
    features: output width (F_in's width when 0).
    dilations: rates (6, 12); empty gives zeros (no residual path).
    kernel: 3 (paper); 1 reproduces the authors' code, where the dilation is a no-op.
    dtype: compute dtype.
  """
  features: int = 0
  dilations: Sequence[int] = (6, 12)
  kernel: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = self.features or x.shape[-1]
    out = jnp.zeros((*x.shape[:-1], width), self.dtype)
    for r in self.dilations:
      out = out + conv(width, self.kernel, self.dtype, f"dilated{r}", dilation=r)(
          x.astype(self.dtype))
    return out


class RFTL(nn.Module):
  """Representation Fusion Transformer Layer (DRFL eq. 10-13, Fig. 3).

  Attributes:
    hidden: token width D (768).
    num_heads: WMAL heads (12).
    mlp_dim: MLP hidden width (3072).
    num_layers: pre-LN WMAL + MLP layers (12, "number of WMAL layers").
    patch_size: p; the token grid is (H/p, W/p).
    dilations, dilated_kernel: the residual path (``DilatedResidual``).
    dropout: dropout in the MLP and after attention (ViT-B: 0.1).
    attention_dropout: dropout on the attention weights (0).
    gate_init, train_gates, key_source: of ``WeightedMultiHeadAttention``.
    dtype: compute dtype.
    implementation: passed to ``jax.nn.dot_product_attention``.

  ``__call__(x (B, H, W, C), context (B, H', W', C') | None, train=False,
  return_attention=False)`` -> (B, H, W, C) float32 in ``dtype``; with ``context`` every
  layer cross-attends from x's tokens (queries) to the context's tokens (keys and
  values; its own patch and position embeddings, "context_embed"/"context_pos_embed").
  With ``return_attention`` also a list of per-layer (B, heads, N, N_ctx) weights.
  """
  hidden: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  num_layers: int = 12
  patch_size: int = 16
  dilations: Sequence[int] = (6, 12)
  dilated_kernel: int = 3
  dropout: float = 0.1
  attention_dropout: float = 0.0
  gate_init: float = 0.1
  train_gates: bool = True
  key_source: str = "context"
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  def _embed(self, x: jnp.ndarray, prefix: str) -> jnp.ndarray:
    """Z_0 = patches E + E_pos (eq. 10)."""
    tokens = patchify(x.astype(self.dtype), self.patch_size)
    z = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                 name=f"{prefix}embed")(tokens)
    pos = self.param(f"{prefix}pos_embed", nn.initializers.normal(0.02),
                     (1, tokens.shape[1], self.hidden), jnp.float32)
    return z + pos.astype(self.dtype)

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None,
               train: bool = False, return_attention: bool = False):
    b, h, w, c = x.shape
    z = self._embed(x, "patch_")
    ctx = None if context is None else self._embed(context, "context_")
    drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)
    all_weights = []
    for i in range(self.num_layers):
      wmal = WeightedMultiHeadAttention(
          self.num_heads, self.gate_init, self.train_gates, self.key_source,
          self.attention_dropout, self.dtype, self.implementation, name=f"wmal{i}")
      ctx_i = None if ctx is None else layer_norm(f"norm_context{i}", self.dtype)(ctx)
      o = wmal(layer_norm(f"norm_attn{i}", self.dtype)(z), ctx_i,
               deterministic=not train, return_attention=return_attention)
      if return_attention:
        o, weights = o
        all_weights.append(weights)
      z = z + drop(o)                                                   # eq. 11
      mlp = TokenMLP(dtype=self.dtype, hidden_dim=self.mlp_dim, dropout=self.dropout,
                     name=f"mlp{i}")
      z = z + mlp(layer_norm(f"norm_mlp{i}", self.dtype)(z),
                  deterministic=not train)                              # eq. 12
    z = layer_norm("encoder_norm", self.dtype)(z)
    z = nn.Dense(self.patch_size * self.patch_size * c, dtype=self.dtype,
                 param_dtype=jnp.float32, name="unembed")(z)
    out = unpatchify(z, self.patch_size, (h, w))                        # Reshape(Z_L)
    out = out + DilatedResidual(c, tuple(self.dilations), self.dilated_kernel,
                                self.dtype, name="dilated")(x)          # eq. 13
    return (out, all_weights) if return_attention else out


class RFTM(RFTL):
  """Representation Fusion Transformer Module (DRFL Sec. 3.2, eq. 8-9, Fig. 2).

    H_seg    = RFTL_seg(F_seg),  H_sr = RFTL_sr(F_sr)        self-attention per stream
    H_fusion = RFTL_fusion(H_sr, context=H_seg)               eq. 8: Q from H_sr, K/V from H_seg
    returns    Concat(H_fusion * F_sr, F_seg)                 the input of eq. 9's Conv

  Attributes are those of ``RFTL`` (shared by the three layers; ``key_source`` is set by
  ``cross_keys``), plus ``cross_keys``: "seg" (paper: K and V from H_seg) or "sr" (the
  authors' code: Q and K from H_sr, V from H_seg).

  ``__call__(f_seg, f_sr (B, H, W, C), train=False, return_attention=False)`` ->
  (B, H, W, 2C) in ``dtype``; with ``return_attention`` also a dict
  {"seg", "sr", "fusion": per-layer weights lists, "h_fusion": the map}.
  """
  cross_keys: str = "seg"

  @nn.compact
  def __call__(self, f_seg: jnp.ndarray, f_sr: jnp.ndarray, train: bool = False,
               return_attention: bool = False):
    if self.cross_keys not in CROSS_KEYS:
      raise ValueError(f"cross_keys must be one of {CROSS_KEYS}, got {self.cross_keys!r}")
    if f_seg.shape != f_sr.shape:
      raise ValueError(f"RFTM needs F_seg and F_sr of one shape, got {f_seg.shape} and "
                       f"{f_sr.shape}")
    shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(RFTL)
              if f.init and f.name not in ("parent", "name", "key_source")}
    layer = functools.partial(RFTL, **shared)
    kw = dict(train=train, return_attention=return_attention)
    h_seg = layer(name="rftl_seg")(f_seg, **kw)
    h_sr = layer(name="rftl_sr")(f_sr, **kw)
    if return_attention:
      (h_seg, w_seg), (h_sr, w_sr) = h_seg, h_sr
    key_source = "context" if self.cross_keys == "seg" else "query"
    h_fusion = layer(key_source=key_source, name="rftl_fusion")(h_sr, h_seg, **kw)  # eq. 8
    if return_attention:
      h_fusion, w_fusion = h_fusion
    fused = jnp.concatenate([h_fusion * f_sr.astype(self.dtype),
                             f_seg.astype(self.dtype)], -1)                  # eq. 9 input
    if return_attention:
      return fused, {"seg": w_seg, "sr": w_sr, "fusion": w_fusion, "h_fusion": h_fusion}
    return fused
