"""`models.attention.attention`: bf16 dots in forward and backward, float32 unchanged.

The XLA path's backward used to contract the float32 logit cotangent with bf16 Q and K
(issue 18: the LDM UNet's bf16 FLOP share 0.972 < 0.99); the custom VJP casts dS to the
operand dtype. These tests pin the dtypes of every dot_general in the lowered program
and the values against a plain einsum reference.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import guards
from medrep_jax.models.attention import AttentionBlock, attention, attention_weights

SHAPE = (2, 12, 3, 8)  # (batch, tokens, heads, head_dim)


def _inputs(lk: int = 12):
  """q (B, 12, N, d), k and v (B, lk, N, d) and an output cotangent, float32."""
  ks = jax.random.split(jax.random.key(0), 4)
  b, lq, n, d = SHAPE
  return (jax.random.normal(ks[0], (b, lq, n, d)), jax.random.normal(ks[1], (b, lk, n, d)),
          jax.random.normal(ks[2], (b, lk, n, d)), jax.random.normal(ks[3], (b, lq, n, d)))


def _reference(q, k, v):
  """The plain einsum formulation (float32 weights times v)."""
  return jnp.einsum("bnqk,bknd->bqnd", attention_weights(q, k), v)


def _bf16(*xs):
  return tuple(x.astype(jnp.bfloat16) for x in xs)


def _loss(q, k, v):
  return jnp.sum(attention(q, k, v).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("lk", [12, 5])  # Self-attention and cross-attention lengths.
def test_every_dot_of_bf16_forward_and_backward_is_bf16(lk):
  q, k, v, _ = _bf16(*_inputs(lk))
  text = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
  report = guards.matmul_dtypes(text)
  # Forward: QK^T and PV; backward: dV, dP, dQ, dK.
  assert report["count"] == 6, report
  assert set(report["dot_general"]) == {"bf16"}, report["f32_ops"]
  assert report["bf16_fraction"] == 1.0
  # Accumulation stays float32: each dot's result type is f32.
  results = [line.rsplit("->", 1)[1] for line in text.splitlines()
             if "stablehlo.dot_general" in line]
  assert all("xf32>" in r for r in results), results


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_float32_forward_and_gradients_equal_the_references(implementation):
  q, k, v, dout = _inputs(7)
  fn = lambda q, k, v: attention(q, k, v, implementation)
  out, vjp = jax.vjp(fn, q, k, v)
  assert out.dtype == jnp.float32
  for ref in (_reference, lambda q, k, v: jax.nn.dot_product_attention(q, k, v)):
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-6, rtol=1e-6)
    for g, r in zip(vjp(dout), ref_vjp(dout)):
      assert g.dtype == jnp.float32
      np.testing.assert_allclose(g, r, atol=2e-6, rtol=1e-5)


def test_bf16_close_to_float32():
  """bf16 inputs (8 bits of mantissa): output and gradients within 2e-2 of float32."""
  q, k, v, dout = _inputs()
  out, vjp = jax.vjp(attention, *_bf16(q, k, v))
  ref_out, ref_vjp = jax.vjp(_reference, q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=2e-2, rtol=2e-2)
  for g, r in zip(vjp(dout.astype(jnp.bfloat16)), ref_vjp(dout)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), r, atol=2e-2 * float(jnp.abs(r).max()))


def test_attention_block_names_and_bf16_grads():
  """The block's parameter names are unchanged and its bf16 step is all-bf16 dots."""
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
  block = AttentionBlock(num_heads=2, dtype=jnp.bfloat16)
  params = block.init(jax.random.key(2), x)["params"]
  assert sorted(params) == ["key_value", "norm", "out", "query"]
  loss = lambda p: jnp.sum(block.apply({"params": p}, x) ** 2)
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  assert set(guards.matmul_dtypes(text)["dot_general"]) == {"bf16"}


def test_cudnn_still_goes_to_the_fused_kernel(monkeypatch):
  """implementation="cudnn" is handed to jax.nn.dot_product_attention unchanged."""
  seen = []
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, implementation=None: seen.append(implementation) or v)
  q, k, v, _ = _inputs()
  attention(q, k, v, "cudnn")
  assert seen == ["cudnn"]
