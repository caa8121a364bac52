"""Matmul weight gradient of 2-D convolutions equals XLA's own, on every stride/padding case."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medrep_jax.models import conv_grad, resnet

DN = ("NHWC", "HWIO", "NHWC")


def _grads(fn, x, w, dy):
  y, vjp = jax.vjp(fn, x, w)
  return (y, *vjp(dy))


@pytest.mark.parametrize("k,stride,padding", [
    (1, 1, "SAME"), (1, 2, "VALID"), (3, 1, "SAME"), (3, 2, "SAME"), (3, 2, ((1, 1), (1, 1))),
    (7, 2, ((3, 3), (3, 3))), (4, 2, ((1, 1), (1, 1))), (3, 1, "VALID"), (2, 3, ((0, 1), (1, 0)))])
@pytest.mark.parametrize("c_out", [4, 1])  # 1: the shifted-dy path (C_out s^2 < C_in)
def test_matches_xla_gradient(k, stride, padding, c_out, monkeypatch):
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  rng = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(rng.standard_normal((3, 11, 9, 5), np.float32))
  w = jnp.asarray(rng.standard_normal((k, k, 5, c_out), np.float32))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                              dimension_numbers=DN)
  new = lambda x, w: conv_grad.conv_general_dilated(x, w, (stride, stride), padding,
                                                   dimension_numbers=DN)
  dy = jnp.asarray(rng.standard_normal(ref(x, w).shape, np.float32))
  for got, want in zip(jax.jit(lambda *a: _grads(new, *a))(x, w, dy),
                       _grads(ref, x, w, dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c_in,c_out", [(3, 4), (9, 2)])  # per-tap slices; shifted dy
def test_weight_grad_against_numpy_loop(c_in, c_out):
  """dW[i, j] = sum over batch and output pixels of x_pad[s*y+i, s*x+j]^T dy[y, x]."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 5, c_in)).astype(np.float32)
  dy = rng.standard_normal((2, 3, 3, c_out)).astype(np.float32)
  pads = ((1, 1), (1, 2))
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  want = np.zeros((3, 3, c_in, c_out), np.float32)
  for i in range(3):
    for j in range(3):
      for yy in range(3):
        for xx in range(3):
          want[i, j] += xp[:, 2 * yy + i, 2 * xx + j, :].T @ dy[:, yy, xx, :]
  got = conv_grad.weight_grad(jnp.asarray(x), jnp.asarray(dy), (3, 3), (2, 2), pads)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_keeps_dtypes(monkeypatch):
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  w = jnp.full((3, 3, 4, 6), 0.1, jnp.bfloat16)
  fn = lambda x, w: conv_grad.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  y, dx, dw = _grads(fn, x, w, jnp.ones((2, 8, 8, 6), jnp.bfloat16))
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  _, _, dw_ref = _grads(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN), x, w, jnp.ones((2, 8, 8, 6), jnp.bfloat16))
  np.testing.assert_allclose(np.float32(dw), np.float32(dw_ref), rtol=1e-2)


def test_other_cases_fall_back_to_lax(monkeypatch):
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  x = jnp.ones((1, 4, 8, 8))
  w = jnp.ones((2, 4, 3, 3))  # NCHW / OIHW and a dilated kernel: not the matmul path
  got = conv_grad.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
  want = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                  dimension_numbers=("NCHW", "OIHW", "NCHW"))
  np.testing.assert_array_equal(got, want)


def test_mode_switch(monkeypatch):
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "xla")
  assert not conv_grad.use_matmul_weight_grad()
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  assert conv_grad.use_matmul_weight_grad()
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "auto")
  cpu = jax.default_backend() == "cpu"
  assert conv_grad.use_matmul_weight_grad() == cpu
  # auto: where the matmul form pays (1x1, strided, few outputs, wide), XLA's elsewhere
  for shape, strides in [((1, 1, 16, 16), (1, 1)), ((3, 3, 16, 32), (2, 2)),
                         ((3, 3, 64, 1), (1, 1)), ((3, 3, 64, 64), (1, 1))]:
    assert conv_grad.use_matmul_weight_grad(shape, strides) == cpu, shape
  assert not conv_grad.use_matmul_weight_grad((3, 3, 32, 32), (1, 1))
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  assert conv_grad.use_matmul_weight_grad((3, 3, 32, 32), (1, 1))
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "fast")
  with pytest.raises(ValueError, match="MEDREP_CONV_WEIGHT_GRAD"):
    conv_grad.use_matmul_weight_grad()


def test_resnet_gradients_match_between_paths(monkeypatch):
  model = resnet.resnet_tiny(small_input=True)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3), np.float32))
  v = model.init(jax.random.PRNGKey(0), x, train=False)

  def loss(params):
    out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return sum(jnp.mean(jnp.square(f)) for f in jax.tree.leaves(out))

  grads = {}
  for mode in ("xla", "matmul"):
    monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", mode)
    grads[mode] = jax.jit(jax.grad(loss))(v["params"])
  for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["matmul"])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


DN3 = ("NDHWC", "DHWIO", "NDHWC")


@pytest.mark.parametrize("k,stride,padding", [
    (1, 1, "SAME"), (1, 2, "VALID"), (3, 1, "SAME"), (3, 2, "SAME"), (3, 1, "VALID"),
    (3, 2, ((1, 1), (1, 1), (1, 1))), (2, 3, ((0, 1), (1, 0), (2, 0))), (3, (1, 2, 2), "SAME")])
@pytest.mark.parametrize("c_out", [4, 1])  # 1: the shifted-dy weight gradient
def test_3d_matches_xla_gradient(k, stride, padding, c_out, monkeypatch):
  """3-D: phase input gradient and per-tap weight gradient equal XLA's (odd sizes)."""
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  strides = (stride,) * 3 if isinstance(stride, int) else stride
  rng = np.random.default_rng(k * 10 + strides[-1])
  x = jnp.asarray(rng.standard_normal((2, 7, 5, 6, 3), np.float32))
  w = jnp.asarray(rng.standard_normal((k, k, k, 3, c_out), np.float32))
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN3)
  new = lambda x, w: conv_grad.conv_general_dilated(x, w, strides, padding,
                                                   dimension_numbers=DN3)
  dy = jnp.asarray(rng.standard_normal(ref(x, w).shape, np.float32))
  for got, want in zip(jax.jit(lambda *a: _grads(new, *a))(x, w, dy),
                       _grads(ref, x, w, dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_3d_flax_dimension_numbers_take_custom_path(monkeypatch):
  """nn.Conv passes ConvDimensionNumbers; 3-D ones are recognized, 2-D still are."""
  assert conv_grad._channels_last_rank(lax.conv_dimension_numbers(
      (1, 4, 4, 4, 2), (3, 3, 3, 2, 2), DN3)) == 3
  assert conv_grad._channels_last_rank(lax.conv_dimension_numbers(
      (1, 4, 4, 2), (3, 3, 2, 2), DN)) == 2
  assert conv_grad._channels_last_rank(("NCDHW", "OIDHW", "NCDHW")) == 0
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "auto")
  cpu = jax.default_backend() == "cpu"
  assert conv_grad.use_phase_input_grad((3, 3, 3, 16, 32), (2, 2, 2)) == cpu
  assert not conv_grad.use_phase_input_grad((3, 3, 3, 16, 16), (1, 1, 1))
  assert conv_grad.use_matmul_weight_grad_3d((3, 3, 3, 16, 16), (1, 1, 1)) == cpu
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "xla")
  assert not conv_grad.use_phase_input_grad((3, 3, 3, 16, 32), (2, 2, 2))
  assert not conv_grad.use_matmul_weight_grad_3d((3, 3, 3, 16, 16), (1, 1, 1))
  x, w = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 2))
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv_grad.conv_general_dilated(
      x, w, (2, 2, 2), "SAME", dimension_numbers=DN3))(x, w))
  assert "custom_vjp" not in jaxpr
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", "matmul")
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv_grad.conv_general_dilated(
      x, w, (2, 2, 2), "SAME", dimension_numbers=DN3))(x, w))
  assert "custom_vjp" in jaxpr


def test_resnet_3d_gradients_match_between_paths(monkeypatch):
  model = resnet.get_resnet("resnet_tiny_3d", small_input=True)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 8, 7, 1), np.float32))
  v = model.init(jax.random.PRNGKey(0), x, train=False)

  def loss(params):
    out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return sum(jnp.mean(jnp.square(f)) for f in jax.tree.leaves(out))

  grads = {}
  for mode in ("xla", "matmul", "auto"):
    monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", mode)
    grads[mode] = jax.jit(jax.grad(loss))(v["params"])
  for mode in ("matmul", "auto"):
    for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads[mode])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
