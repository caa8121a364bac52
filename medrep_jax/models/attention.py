"""Multi-head (cross-)attention over the positions of a feature map.

One residual block serves three uses in the diffusion UNet:

* self-attention at chosen resolutions (Ho et al., 2020; Dhariwal & Nichol,
  2021), when ``context`` is None;
* cross-attention to a conditioning sequence (Rombach et al., LDM, 2022,
  eq. 3: Q from the UNet features, K and V from the context);
* DSDM's Cross-Attention Alignment (paper 004, eq. 10-11), where the context
  is the Psi_FC tokens of the reference embedding
  (``conditioning.ReferenceTokens``), with a residual connection.

Arrays use the (batch, length, heads, head_dim) layout of
``jax.nn.dot_product_attention``; logits and the softmax are float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.models.conditioning import group_norm
from medrep_jax.models.resnet import Dtype


def attention_weights(q: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  """softmax(Q K^T / sqrt(d)) over keys (DSDM eq. 11), float32.

  Args:
    q: queries (B, Lq, N, d).
    k: keys (B, Lk, N, d).

  Returns:
    (B, N, Lq, Lk) weights; each row sums to 1 over the Lk keys.
  """
  logits = jnp.einsum("bqnd,bknd->bnqk", q.astype(jnp.float32),
                      k.astype(jnp.float32))
  return jax.nn.softmax(logits / jnp.sqrt(jnp.float32(q.shape[-1])), axis=-1)


def _mixed_einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray, dtype) -> jnp.ndarray:
  """``einsum(spec, a, b)`` on operands cast to ``dtype``, accumulated in float32.

  Both operands enter the dot in the compute dtype (bf16 under mixed precision), so the
  matmul runs on the low-precision units; the float32 result keeps the sum exact enough
  for the softmax. For float32 operands it is the plain float32 einsum.
  """
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32)


def _attention_forward(q, k, v):
  """Output (in v's dtype) and the float32 softmax probabilities (B, N, Lq, Lk)."""
  # The scale multiplies the float32 logits after the dot, as jax.nn's XLA path does.
  scale = jnp.float32(1.0 / np.sqrt(q.shape[-1]))
  logits = _mixed_einsum("bqnd,bknd->bnqk", q, k, jnp.promote_types(q.dtype, k.dtype))
  probs = jax.nn.softmax(logits * scale, axis=-1)
  o = _mixed_einsum("bnqk,bknd->bqnd", probs, v, v.dtype)
  return o.astype(v.dtype), probs


@jax.custom_vjp
def _xla_attention(q, k, v):
  """softmax(Q K^T / sqrt(d)) V whose forward and backward dots take the inputs' dtype."""
  return _attention_forward(q, k, v)[0]


def _xla_attention_fwd(q, k, v):
  o, probs = _attention_forward(q, k, v)
  return o, (q, k, v, probs)


def _xla_attention_bwd(res, do):
  """The attention VJP with every dot in the compute dtype, float32 accumulation.

  Autodiff of the forward would contract the float32 logit cotangent with bf16 Q and K
  (mixed-dtype dots, float32 on the matmul units); here dS is cast to the operand dtype
  first, as fused attention kernels do. The softmax backward stays float32.
  """
  q, k, v, probs = res
  scale = jnp.float32(1.0 / np.sqrt(q.shape[-1]))
  dt = v.dtype
  dv = _mixed_einsum("bnqk,bqnd->bknd", probs, do, dt)
  dp = _mixed_einsum("bqnd,bknd->bnqk", do, v, dt)
  ds = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True)) * scale
  dq = _mixed_einsum("bnqk,bknd->bqnd", ds, k, k.dtype)
  dk = _mixed_einsum("bnqk,bqnd->bknd", ds, q, q.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
              implementation: str | None = None) -> jnp.ndarray:
  """softmax(Q K^T / sqrt(d)) V, shape (B, Lq, N, d), in v's dtype.

  Equal to ``einsum("bnqk,bknd->bqnd", attention_weights(q, k), v)``.
  ``implementation="cudnn"`` runs ``jax.nn.dot_product_attention``'s fused GPU kernel
  (bf16/fp16 inputs). None or "xla" runs the same math as its XLA path (float32 logits
  and softmax), with a custom VJP so that in bf16 every dot of the forward and the
  backward has bf16 operands and float32 accumulation (the XLA path's backward
  contracts the float32 dS with bf16 Q and K); float32 inputs give its results.
  """
  if implementation in (None, "xla"):
    return _xla_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def attend(module: nn.Module, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
           implementation: str | None = None, return_attention: bool = False,
           dropout: float = 0.0, deterministic: bool = True):
  """Multi-head attention output (B, N, heads, dh) and its weights (or None).

  The fused `attention` kernel, unless the weights are needed: asked for, sown into a
  mutable "intermediates" collection (`attention_weights`), or dropped out (`dropout`
  with `deterministic=False`, which needs a "dropout" rng). Call it inside `module`'s
  compact method.
  """
  drop = dropout > 0 and not deterministic
  if not (return_attention or drop or module.is_mutable_collection("intermediates")):
    return attention(q, k, v, implementation), None
  weights = attention_weights(q, k)
  module.sow("intermediates", "attention_weights", weights)
  probs = nn.Dropout(dropout)(weights, deterministic=not drop) if drop else weights
  return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v), weights


def head_layout(channels: int, num_heads: int, head_dim: int) -> tuple[int, int]:
  """(heads, head width) for ``channels``: fixed head_dim if > 0, else num_heads.

  Raises:
    ValueError: the channels do not split evenly.
  """
  if head_dim > 0:
    if channels % head_dim:
      raise ValueError(f"attention over {channels} channels: not divisible by "
                       f"head_dim={head_dim}")
    return channels // head_dim, head_dim
  if num_heads <= 0 or channels % num_heads:
    raise ValueError(f"attention over {channels} channels: not divisible by "
                     f"num_heads={num_heads}")
  return num_heads, channels // num_heads


class AttentionBlock(nn.Module):
  """Residual multi-head attention: ``x + W_o attn(W_q GN(x), W_k c, W_v c)``.

  W_q, W_k, W_v have no bias (as in LDM); W_k and W_v share one kernel
  (``key_value``). ``c`` is GN(x) itself (self-attention) when ``context`` is None, else the
  context sequence (cross-attention; LDM eq. 3, DSDM eq. 10-11). The output
  projection is zero-initialized, so a fresh block is the identity.

  Attributes:
    num_heads: heads when ``head_dim`` is 0.
    head_dim: fixed head width (heads = C // head_dim) when > 0.
    max_groups: GroupNorm group cap for the query-side norm.
    dtype: compute dtype; parameters float32, softmax float32.
    implementation: passed to ``jax.nn.dot_product_attention``.

  ``__call__(x (B, H, W, C), context (B, L, D) | None) -> (B, H, W, C)``.
  """
  num_heads: int = 4
  head_dim: int = 0
  max_groups: int = 32
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               context: jnp.ndarray | None = None) -> jnp.ndarray:
    b, h, w, c = x.shape
    heads, dh = head_layout(c, self.num_heads, self.head_dim)
    tokens = group_norm(x, self.max_groups, name="norm").astype(self.dtype)
    tokens = tokens.reshape(b, h * w, c)
    src = tokens if context is None else context.astype(self.dtype)
    proj = lambda shape, name: nn.DenseGeneral(
        shape, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q = proj((heads, dh), "query")(tokens)
    k, v = jnp.unstack(proj((2, heads, dh), "key_value")(src), axis=-3)
    o = attention(q, k, v, self.implementation)
    o = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype,
                        param_dtype=jnp.float32,
                        kernel_init=nn.initializers.zeros, name="out")(o)
    return x + o.reshape(b, h, w, c).astype(x.dtype)
