"""Projection heads for contrastive pretraining.

* ``MLPProjector``: Linear-BN-ReLU-Linear on pooled features (SimCLR, Chen
  et al., 2020; MoCo-v2, Chen et al., 2020). DCL-CsTP's "w/o cross-scale
  token projection" ablation (paper 000, Table 3).
* ``SimSiamPredictor``: the bottleneck predictor h of SimSiam (Chen & He,
  2021), used by DCL-CsTP's local stream (eq. 6).
* ``CrossScaleTokenProjection`` (CsTP, paper 000, Sec. III-D, Fig. 4b) with
  its ``CrossScaleAttention`` (CSA, Fig. 4a, eq. 7) on the encoder's last
  feature map.

Reading of Fig. 4 (the figure itself is not in the text; the prose fixes the
order of operations, the kernel sizes of the two multi-scale branches are our
choice, configurable):

  y     = LN(x)                                   (B, H, W, d), pre-LN
  high  = DWConv_{3x3, s1}(y)                     (H, W)      "dw_high"
  low   = DWConv_{5x5, s2}(y)                     (H/2, W/2)  "dw_low"
  z     = low + DWConv_{3x3, s2, p1}(high)                    "dw_down"
  z     = z + DWConv_{3x3, s1, p1}(z)                         "dw_refine"
  kv    = tokens(Conv_{1x1}(z))                   (B, ceil(H/2) ceil(W/2), d)
  attn  = softmax(W_q y . (W_k kv)^T / sqrt(d_h)) W_v kv       eq. 7, per head
  x     = x + W_o attn;  x = x + MLP(LN(x))       MLP: d -> 4d -> d, GELU

All convolutions use padding k // 2, so a stride-s conv maps n to ceil(n / s)
and ``low`` and ``dw_down(high)`` have the same grid whenever
``low_stride == 2 * high_stride`` (checked). Queries are the tokens of the
(normalized) input map, so attention has H*W queries and the fused low-res
token count of keys. ``attention="standard"`` (Table 3, "w/o cross-scale
attention") drops the convolution branch: K and V are the input tokens.

Parameters and LayerNorm/BatchNorm statistics are float32; matmuls and convs
run in ``dtype`` (e.g. bfloat16); attention logits and the softmax are float32;
every head returns float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models.attention import attend, head_layout
from medrep_jax.models.resnet import Dtype, make_norm
from medrep_jax.models.unet import last_feature_map

FeaturesOrArray = Mapping[str, jnp.ndarray] | jnp.ndarray
MLP_NORMS = ("batch", "none")
ATTENTIONS = ("csa", "standard")


def _pooled_input(features: FeaturesOrArray) -> jnp.ndarray:
  """``features["pooled"]`` of an encoder dict, or a (B, C) array as is."""
  x = features["pooled"] if isinstance(features, Mapping) else features
  if x.ndim != 2:
    raise ValueError(f"MLP heads expect pooled features (B, C), got shape {x.shape}")
  return x


def _map_input(features: FeaturesOrArray) -> jnp.ndarray:
  """The deepest ``"c<i>"`` map of an encoder dict, or a (B, H, W, C) array."""
  x = last_feature_map(features) if isinstance(features, Mapping) else features
  if x.ndim != 4:
    raise ValueError(f"CsTP expects a feature map (B, H, W, C), got shape {x.shape}")
  return x


def _mlp(x: jnp.ndarray, hidden: Sequence[int], out_dim: int, norm: str,
         train: bool, dtype: Dtype) -> jnp.ndarray:
  """(Dense-norm-ReLU) per ``hidden`` width, then Dense; in the caller's scope.

  Layers are named fc1, norm1, ..., fc{n}; hidden Dense layers have no bias
  when a BatchNorm follows.
  """
  if norm not in MLP_NORMS:
    raise ValueError(f"norm must be one of {MLP_NORMS}, got {norm!r}")
  x = x.astype(dtype)
  for i, width in enumerate(hidden):
    x = nn.Dense(width, use_bias=norm == "none", dtype=dtype,
                 param_dtype=jnp.float32, name=f"fc{i + 1}")(x)
    x = nn.relu(make_norm(norm, x, train, name=f"norm{i + 1}", dtype=dtype))
  x = nn.Dense(out_dim, dtype=dtype, param_dtype=jnp.float32,
               name=f"fc{len(hidden) + 1}")(x)
  return x.astype(jnp.float32)


class MLPProjector(nn.Module):
  """Projector g: ``num_layers`` Dense layers, BN + ReLU between them.

  With the defaults this is Dense(2048)-BN-ReLU-Dense(128), the MoCo-v2/SimCLR
  head; ``norm="none"`` gives Dense-ReLU-Dense (MoCo-v2 as published).

  Attributes:
    hidden_dim: width of the hidden layers.
    out_dim: embedding size.
    num_layers: Dense layers in total (>= 1; 1 is a linear projection).
    norm: "batch" or "none".
    dtype: compute dtype; parameters and BN statistics are float32.

  ``__call__(features, train)`` takes an encoder features dict (uses
  ``"pooled"``) or a (B, C) array and returns (B, out_dim) float32.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  num_layers: int = 2
  norm: str = "batch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: FeaturesOrArray, train: bool = False) -> jnp.ndarray:
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    hidden = [self.hidden_dim] * (self.num_layers - 1)
    return _mlp(_pooled_input(features), hidden, self.out_dim, self.norm,
                train, self.dtype)


class SimSiamPredictor(nn.Module):
  """Predictor h: Dense(hidden)-BN-ReLU-Dense(out) bottleneck (SimSiam, eq. 6).

  Attributes:
    hidden_dim: bottleneck width (512 in SimSiam for a 2048-d output).
    out_dim: output width; None keeps the input width (h maps z to z's space).
    dtype: compute dtype; parameters and BN statistics are float32.

  ``__call__(z (B, D), train) -> (B, out_dim or D)`` float32.
  """
  hidden_dim: int = 512
  out_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    z = _pooled_input(z)
    out = z.shape[-1] if self.out_dim is None else self.out_dim
    return _mlp(z, [self.hidden_dim], out, "batch", train, self.dtype)


def _conv_out(n: int, kernel: int, stride: int) -> int:
  """Output length of a conv with padding kernel // 2 (odd kernel): ceil(n/s)."""
  pad = kernel // 2
  return (n + 2 * pad - kernel) // stride + 1


def key_grid(height: int, width: int, low_kernel: int = 5,
             low_stride: int = 2) -> tuple[int, int]:
  """Spatial grid of CSA's fused keys/values for an (height, width) map.

  The key count is the product; (7, 7) -> (4, 4) with the defaults.
  """
  return (_conv_out(height, low_kernel, low_stride),
          _conv_out(width, low_kernel, low_stride))


def _dw_conv(x: jnp.ndarray, kernel: int, stride: int, name: str,
             dtype: Dtype) -> jnp.ndarray:
  """Depth-wise k x k conv with padding k // 2, in the caller's scope."""
  c, p = x.shape[-1], kernel // 2
  return nn.Conv(c, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                 feature_group_count=c, dtype=dtype, param_dtype=jnp.float32,
                 name=name)(x)


class CrossScaleAttention(nn.Module):
  """Cross-scale attention (CSA, paper 000, Fig. 4a, eq. 7).

  Queries are the H*W tokens of the input map; keys and values are the
  tokens of the fused multi-scale map (see the module docstring), so there
  are ``prod(key_grid(H, W))`` keys. ``cross_scale=False`` is plain
  multi-head self-attention (K, V from the input tokens).

  Attributes:
    num_heads: attention heads; the width must divide evenly.
    cross_scale: CSA keys/values when True, the input tokens when False.
    high_kernel, high_stride: depth-wise conv of the high-resolution branch.
    low_kernel, low_stride: depth-wise conv of the low-resolution branch;
      ``low_stride`` must equal ``2 * high_stride`` (the 3x3 stride-2
      down-sampling must land on the low-resolution grid); kernels are odd.
    dtype: compute dtype; logits and softmax are float32.
    implementation: passed to ``jax.nn.dot_product_attention``.

  ``__call__(x (B, H, W, d), return_attention=False) -> (B, H*W, d)``, plus
  the (B, heads, H*W, num_keys) float32 weights when ``return_attention``.
  The weights are also sown into ``"intermediates"`` (``attention_weights``)
  when that collection is mutable; the output is then computed from them.
  """
  num_heads: int = 8
  cross_scale: bool = True
  high_kernel: int = 3
  high_stride: int = 1
  low_kernel: int = 5
  low_stride: int = 2
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  def _check(self) -> None:
    if self.high_kernel % 2 == 0 or self.low_kernel % 2 == 0:
      raise ValueError("CSA kernels must be odd, got high_kernel="
                       f"{self.high_kernel}, low_kernel={self.low_kernel}")
    if self.high_stride < 1 or self.low_stride != 2 * self.high_stride:
      raise ValueError("CSA needs low_stride == 2 * high_stride >= 2, got "
                       f"high_stride={self.high_stride}, low_stride={self.low_stride}")

  def cross_scale_tokens(self, x: jnp.ndarray) -> jnp.ndarray:
    """Fused multi-scale key/value tokens (B, num_keys, d) of map ``x``."""
    self._check()
    high = _dw_conv(x, self.high_kernel, self.high_stride, "dw_high", self.dtype)
    low = _dw_conv(x, self.low_kernel, self.low_stride, "dw_low", self.dtype)
    z = low + _dw_conv(high, 3, 2, "dw_down", self.dtype)
    z = z + _dw_conv(z, 3, 1, "dw_refine", self.dtype)
    z = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                name="fuse")(z)
    return z.reshape(z.shape[0], -1, z.shape[-1])

  @nn.compact
  def __call__(self, x: jnp.ndarray, return_attention: bool = False
               ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    b, h, w, d = x.shape
    heads, dh = head_layout(d, self.num_heads, 0)
    x = x.astype(self.dtype)
    tokens = x.reshape(b, h * w, d)
    src = self.cross_scale_tokens(x) if self.cross_scale else tokens
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                              param_dtype=jnp.float32)
    q = dense((heads, dh), name="query")(tokens)
    k, v = jnp.unstack(dense((2, heads, dh), name="key_value")(src), axis=-3)
    o, weights = attend(self, q, k, v, implementation=self.implementation,  # eq. 7
                        return_attention=return_attention)
    o = dense(d, axis=(-2, -1), name="out")(o)
    return (o, weights) if return_attention else o


class TokenMLP(nn.Module):
  """Transformer MLP: Dense(hidden)-GELU-Dense(d), hidden = ``hidden_dim`` or ratio * d.

  ``dropout`` (ViT: after the GELU and after fc2) is active when
  ``deterministic=False`` and needs a ``"dropout"`` rng.
  """
  ratio: int = 4
  dtype: Dtype = jnp.float32
  hidden_dim: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    d = x.shape[-1]
    drop = nn.Dropout(self.dropout, deterministic=deterministic or self.dropout == 0)
    x = nn.gelu(dense(self.hidden_dim or self.ratio * d, name="fc1")(x), approximate=False)
    return drop(dense(d, name="fc2")(drop(x)))


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  """LayerNorm (eps 1e-6) named ``name``: statistics, scale and bias float32."""
  # Statistics in float32 (force_float32_reductions), scale/bias float32.
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


_layer_norm = layer_norm


class CrossScaleBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)) (Fig. 4b).

  The attention submodule is ``cross_scale_attention`` (CSA) or, with
  ``attention="standard"``, ``self_attention``. Maps stay (B, H, W, d) so
  every block's CSA sees the spatial layout.
  """
  num_heads: int = 8
  mlp_ratio: int = 4
  attention: str = "csa"
  csa: Mapping[str, int] = dataclasses.field(default_factory=dict)
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    csa = self.attention == "csa"
    attn = CrossScaleAttention(
        num_heads=self.num_heads, cross_scale=csa, dtype=self.dtype,
        implementation=self.implementation, **self.csa,
        name="cross_scale_attention" if csa else "self_attention")
    x = x + attn(_layer_norm("norm1", self.dtype)(x)).reshape(x.shape)
    y = TokenMLP(self.mlp_ratio, self.dtype, name="mlp")(
        _layer_norm("norm2", self.dtype)(x))
    return x + y


class CrossScaleTokenProjection(nn.Module):
  """Cross-scale token projection T (CsTP, paper 000, Sec. III-D, Fig. 4b).

  1x1 conv of the last feature map to ``embed_dim`` ("input_proj"),
  ``depth`` pre-LN blocks with cross-scale attention ("block{i}"), a final
  LayerNorm ("norm"), mean-pooling over the H*W tokens and a linear layer to
  ``out_dim`` ("head").

  Attributes:
    embed_dim: token width d (the paper does not state it).
    out_dim: embedding size (128, as the MLP projector).
    num_heads: attention heads.
    depth: number of blocks (1).
    mlp_ratio: MLP expansion (4).
    attention: "csa" or "standard" (Table 3, "w/o cross-scale attention").
    high_kernel, high_stride, low_kernel, low_stride: CSA branch convs.
    dtype: compute dtype; parameters and LN statistics float32.
    implementation: passed to ``jax.nn.dot_product_attention``.

  ``__call__(features, train)`` takes an encoder features dict (uses the
  deepest ``"c<i>"`` map) or a (B, H, W, C) array and returns (B, out_dim)
  float32. ``train`` is unused (no BN or dropout) and kept so every projector
  has the same signature.
  """
  embed_dim: int = 512
  out_dim: int = 128
  num_heads: int = 8
  depth: int = 1
  mlp_ratio: int = 4
  attention: str = "csa"
  high_kernel: int = 3
  high_stride: int = 1
  low_kernel: int = 5
  low_stride: int = 2
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, features: FeaturesOrArray, train: bool = False) -> jnp.ndarray:
    del train
    x = _map_input(features).astype(self.dtype)
    x = nn.Conv(self.embed_dim, (1, 1), dtype=self.dtype,
                param_dtype=jnp.float32, name="input_proj")(x)
    csa = dict(high_kernel=self.high_kernel, high_stride=self.high_stride,
               low_kernel=self.low_kernel, low_stride=self.low_stride)
    for i in range(self.depth):
      x = CrossScaleBlock(self.num_heads, self.mlp_ratio, self.attention, csa,
                          self.dtype, self.implementation, name=f"block{i}")(x)
    x = _layer_norm("norm", self.dtype)(x)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 name="head")(x)
    return x.astype(jnp.float32)


PROJECTORS: dict[str, type[nn.Module]] = {
    "mlp": MLPProjector,
    "cstp": CrossScaleTokenProjection,
}


def make_projector(kind: str, /, **kw: Any) -> nn.Module:
  """Projector for the ablation switch ``projector=mlp|cstp`` (Table 3).

  Both kinds are called as ``projector(features, train)`` on the encoder's
  features dict: "mlp" reads ``"pooled"``, "cstp" the last feature map.

  Raises:
    ValueError: unknown ``kind`` or an attribute the kind does not have.
  """
  if kind not in PROJECTORS:
    raise ValueError(f"projector must be one of {list(PROJECTORS)}, got {kind!r}")
  cls = PROJECTORS[kind]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent"}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"projector {kind!r} has no attribute(s) {unknown}; "
                     f"valid: {sorted(fields)}")
  return cls(**kw)
