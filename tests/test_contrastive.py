"""Tests for medrep_jax.losses.contrastive against float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medrep_jax.losses import contrastive as cl

B, D, K = 6, 8, 12


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture
def emb():
  rng = np.random.default_rng(0)
  q, k, p = (_unit(rng.normal(size=(B, D))) for _ in range(3))
  bank = _unit(rng.normal(size=(K, D)))
  return q, k, p, bank


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def test_info_nce_matches_numpy(emb):
  q, k, _, bank = emb
  tau = 0.2
  ref = np.empty(B)
  for i in range(B):
    pos = np.exp(q[i] @ k[i] / tau)
    neg = sum(np.exp(q[i] @ n / tau) for n in bank)
    ref[i] = -np.log(pos / (pos + neg))  # eq. 3, term by term
  out = jax.jit(cl.info_nce_with_bank)(*_f32(q, k, bank), tau)
  assert out.shape == (B,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  # Default τ and bf16 inputs: computed in float32, close to the float64 reference.
  out_bf16 = jax.jit(cl.info_nce_with_bank)(
      *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, bank)))
  assert out_bf16.dtype == jnp.float32
  ref_default = -_np_log_softmax(np.concatenate(
      [np.sum(q * k, 1, keepdims=True), q @ bank.T], 1) / cl.DCL_TEMPERATURE)[:, 0]
  np.testing.assert_allclose(out_bf16, ref_default, rtol=0.05)


def test_bank_diagnostics_match_numpy(emb):
  q, k, _, bank = emb
  out = jax.jit(cl.bank_diagnostics)(*_f32(q, k, bank))
  pos, neg = np.sum(q * k, 1), q @ bank.T
  np.testing.assert_allclose(out["pos_cos"], pos.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["neg_cos"], neg.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["top1"], np.mean(pos > neg.max(1)))
  # A query that is its own positive key beats every other unit key.
  assert float(cl.bank_diagnostics(*_f32(q, q, bank))["top1"]) == 1.0


def test_symmetric_kl_matches_numpy_and_properties(emb):
  q, _, p, bank = emb
  tau = 0.2
  lp, lq = _np_log_softmax(p @ bank.T / tau), _np_log_softmax(q @ bank.T / tau)
  pp, qq = np.exp(lp), np.exp(lq)
  ref = 0.5 * (pp * (lp - lq)).sum(1) + 0.5 * (qq * (lq - lp)).sum(1)  # eq. 4
  f = jax.jit(cl.symmetric_kl)
  out = f(*_f32(p, q, bank), tau)
  assert out.shape == (B,)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(out) > 0)
  np.testing.assert_allclose(f(*_f32(q, p, bank), tau), out, rtol=1e-6)  # symmetric
  np.testing.assert_allclose(f(*_f32(p, p, bank), tau), 0.0, atol=1e-7)  # KL(P‖P) = 0
  # Stable at a sharp temperature where a naive softmax-then-log would underflow.
  assert np.all(np.isfinite(np.asarray(f(*_f32(p, q, bank), 1e-3))))


def test_negative_cosine_and_simsiam_pairing():
  rng = np.random.default_rng(1)
  q2, z3, q3, z2 = (rng.normal(size=(B, D)) * 3 for _ in range(4))

  def cos(a, b):
    return (_unit(a) * _unit(b)).sum(1)

  neg_cos = jax.jit(cl.negative_cosine)
  np.testing.assert_allclose(neg_cos(*_f32(q2, z3)), -cos(q2, z3), rtol=1e-5)
  np.testing.assert_allclose(neg_cos(*_f32(q2, 2 * q2)), -1.0, rtol=1e-6)
  out = jax.jit(cl.simsiam_loss)(*_f32(q2, z3, q3, z2))
  ref = -0.5 * cos(q2, z3) - 0.5 * cos(q3, z2)  # eq. 6
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  wrong = -0.5 * cos(q2, z2) - 0.5 * cos(q3, z3)  # the unswapped pairing
  assert not np.allclose(out, wrong, rtol=1e-3)


def _np_nt_xent(z1, z2, tau):
  z = _unit(np.concatenate([z1, z2]))
  n = len(z)
  out = np.empty(n)
  for i in range(n):
    j = (i + n // 2) % n
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)  # 𝟙(i ≠ k)
    out[i] = -np.log(np.exp(z[i] @ z[j] / tau) / denom)
  return out


def test_nt_xent_matches_numpy_and_excludes_self():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(B, D)), rng.normal(size=(B, D))
  nt_xent = jax.jit(cl.nt_xent)
  for tau in (0.05, 0.5):
    out = nt_xent(*_f32(z1, z2), tau)
    assert out.shape == (2 * B,)
    np.testing.assert_allclose(out, _np_nt_xent(z1, z2, tau), rtol=1e-4)
  # Including k = i would add exp(1/τ) to every denominator: with τ = 0.5 and orthogonal
  # views (positive logit 0), the loss would be > log(e²) = 2; excluding it gives log(2B-1).
  eye = np.eye(2 * B)  # 2B mutually orthogonal unit vectors
  out = nt_xent(*_f32(eye[:B], eye[B:]), 0.5)
  np.testing.assert_allclose(out, np.log(2 * B - 1), rtol=1e-6)
  assert float(nt_xent(*_f32(z1, z2), cl.CAMCONTRAST_TEMPERATURE).mean()) == pytest.approx(
      _np_nt_xent(z1, z2, cl.CAMCONTRAST_TEMPERATURE).mean(), rel=1e-4)


def test_supcon_matches_numpy():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(8, D))
  labels = np.array([0, 1, 0, 2, 1, 0, 1, 3])  # class 2 and 3 anchors have no positive
  tau = 0.1
  zu = _unit(z)
  ref = np.zeros(8)
  for i in range(8):
    others = [a for a in range(8) if a != i]
    positives = [p for p in others if labels[p] == labels[i]]
    log_denom = np.log(sum(np.exp(zu[i] @ zu[a] / tau) for a in others))
    if positives:
      ref[i] = -np.mean([zu[i] @ zu[p] / tau - log_denom for p in positives])
  supcon = jax.jit(cl.supcon)
  out = supcon(jnp.asarray(z, jnp.float32), jnp.asarray(labels), tau)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(cl.has_positive(jnp.asarray(labels)), ref != 0)
  # All labels distinct: no positives, loss 0. Two views of B images, labels = image id:
  # SupCon reduces to NT-Xent.
  np.testing.assert_allclose(supcon(jnp.asarray(z, jnp.float32), jnp.arange(8), tau), 0.0)
  z1, z2 = z[:4], z[4:]
  np.testing.assert_allclose(
      supcon(*_f32(z), jnp.tile(jnp.arange(4), 2), tau), _np_nt_xent(z1, z2, tau),
      rtol=1e-4)


def _grad(fn, argnums=0):
  return jax.jit(jax.grad(fn, argnums=argnums))


def test_stop_gradient_blocks_target_side(emb):
  q, k, p, bank = _f32(*emb)
  # negative_cosine / simsiam stop the target themselves.
  g_q, g_p = _grad(lambda q_, p_: cl.negative_cosine(q_, p_).sum(), (0, 1))(q, p)
  assert float(jnp.abs(g_p).max()) == 0.0 and float(jnp.abs(g_q).max()) > 0
  grads = _grad(lambda *a: cl.simsiam_loss(*a).sum(), (0, 1, 2, 3))(q, k, p, bank[:B])
  assert [float(jnp.abs(g).max()) > 0 for g in grads] == [True, False, True, False]
  # symmetric_kl: the caller's stop_gradient on p leaves only the query gradient.
  g_p, g_q, g_n = _grad(
      lambda p_, q_, n_: cl.symmetric_kl(jax.lax.stop_gradient(p_), q_, n_).sum(),
      (0, 1, 2))(p, q, bank)
  assert float(jnp.abs(g_p).max()) == 0.0 and float(jnp.abs(g_q).max()) > 0
  assert float(jnp.abs(g_n).max()) == 0.0  # the bank is never differentiated
  g_k, g_n = _grad(lambda k_, n_: cl.info_nce_with_bank(q, k_, n_).sum(), (0, 1))(k, bank)
  assert float(jnp.abs(g_k).max()) > 0 and float(jnp.abs(g_n).max()) == 0.0
  # The masked NT-Xent / SupCon denominators give finite gradients.
  for g in (_grad(lambda a: cl.nt_xent(a, k).mean())(q),
            _grad(lambda a: cl.supcon(a, jnp.array([0, 0, 1, 1, 2, 3])).mean())(q)):
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_losses_under_jit_with_sharded_batch(emb):
  q, k, p, bank = _f32(*emb)
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))  # B = 6 splits over 2 devices
  shard = NamedSharding(mesh, P("data"))
  qs, ks, ps = (jax.device_put(x, shard) for x in (q, k, p))

  def total(q_, k_, p_, n_):
    return (cl.info_nce_with_bank(q_, k_, n_) + 0.3 * cl.symmetric_kl(p_, q_, n_)
            + 0.7 * cl.simsiam_loss(q_, k_, p_, q_) + cl.nt_xent(q_, k_)[:B]
            + cl.supcon(jnp.concatenate([q_, k_]), jnp.arange(2 * B) % B)[:B])

  out = jax.jit(total)(qs, ks, ps, bank)
  assert out.sharding.spec == P("data")  # per-example losses stay sharded
  ref = jax.jit(total)(q, k, p, bank)  # unsharded inputs
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_shape_errors(emb):
  q, k, _, bank = _f32(*emb)
  with pytest.raises(ValueError, match="bank must be"):
    cl.info_nce_with_bank(q, k, bank[:, :3])
  with pytest.raises(ValueError, match="nt_xent"):
    cl.nt_xent(q, k[:2])
  with pytest.raises(ValueError, match="supcon"):
    cl.supcon(q, jnp.arange(3))
