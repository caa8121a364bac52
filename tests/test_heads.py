"""Tests for medrep_jax.models.heads (MLP projector, predictor, CsTP/CSA)."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medrep_jax.models import heads

B, C, D, OUT, HEADS = 2, 64, 32, 16, 4
CSTP_KW = dict(embed_dim=D, out_dim=OUT, num_heads=HEADS)


def _key(seed=0):
  # rbg keys: XLA:CPU compiles threefry-based init programs ~10x slower.
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _features(h, w, c=C, seed=0):
  """An encoder-style features dict whose c4 would break a head that used it."""
  c5 = _normal(seed, (B, h, w, c))
  return {"c4": _normal(seed + 1, (B, 2 * h, 2 * w, c // 2)), "c5": c5,
          "pooled": jnp.mean(c5, axis=(1, 2))}


def _heads(dtype=jnp.float32):
  return {
      "mlp": heads.make_projector("mlp", hidden_dim=D, out_dim=OUT, dtype=dtype),
      "predictor": heads.SimSiamPredictor(hidden_dim=8, dtype=dtype),
      "csa": heads.make_projector("cstp", **CSTP_KW, dtype=dtype),
      "standard": heads.make_projector("cstp", **CSTP_KW, attention="standard",
                                       dtype=dtype),
  }


class _AllHeads(nn.Module):
  """Every head under one init (one compile instead of four)."""

  @nn.compact
  def __call__(self, features):
    out = {}
    for name, head in _heads().items():
      head = head.clone(parent=self, name=name)
      out[name] = head(out["mlp"] if name == "predictor" else features, train=False)
    return out


@pytest.fixture(scope="module")
def variables():
  """{head name: variables} from one jitted init on a 7x7 map."""
  v = jax.jit(lambda f: _AllHeads().init(_key(), f))(_features(7, 7))
  return {name: {col: v[col][name] for col in v if name in v[col]}
          for name in _heads()}


def _paths(tree):
  return ["/".join(k) for k in traverse_util.flatten_dict(tree)]


def _apply(model, v, features, **kw):
  return jax.jit(lambda v, f: model.apply(v, f, **kw))(v, features)


def test_mlp_projector_and_predictor_shapes(variables):
  f = _features(7, 7)
  mods = _heads()
  z = _apply(mods["mlp"], variables["mlp"], f, train=False)
  chex.assert_shape(z, (B, OUT))
  assert z.dtype == jnp.float32
  p = _apply(mods["predictor"], variables["predictor"], z, train=False)
  chex.assert_shape(p, (B, OUT))  # out_dim=None keeps the input width
  assert _paths(variables["mlp"]["params"]) == [
      "fc1/kernel", "fc2/bias", "fc2/kernel", "norm1/bias", "norm1/scale"]
  chex.assert_tree_all_finite((z, p))


@pytest.mark.parametrize("attention", ["csa", "standard"])
@pytest.mark.parametrize("size", [3, 7])
def test_cstp_shapes_and_attention_weights(variables, attention, size):
  """Rows of eq. 7 sum to 1; CSA keys are the fused low-res tokens."""
  model = _heads()[attention]
  out, state = _apply(model, variables[attention], _features(size, size),
                      mutable=["intermediates"], train=False)
  chex.assert_shape(out, (B, OUT))
  assert out.dtype == jnp.float32
  block = state["intermediates"]["block0"]
  name = "cross_scale_attention" if attention == "csa" else "self_attention"
  (w,) = block[name]["attention_weights"]
  keys = math.ceil(size / 2) ** 2 if attention == "csa" else size * size
  chex.assert_shape(w, (B, HEADS, size * size, keys))
  assert w.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(w) >= 0)


def test_fused_attention_path_matches_returned_weights(variables):
  """Output via jax.nn.dot_product_attention equals softmax(QK^T/sqrt d) V."""
  model, v, f = _heads()["csa"], variables["csa"], _features(7, 7, seed=3)
  fused = _apply(model, v, f, train=False)
  explicit, _ = _apply(model, v, f, train=False, mutable=["intermediates"])
  np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw,strides,expected", [
    ((7, 7), (1, 2), (4, 4)), ((3, 3), (1, 2), (2, 2)), ((8, 6), (1, 2), (4, 3)),
    ((5, 9), (1, 2), (3, 5)), ((8, 8), (2, 4), (2, 2)), ((7, 10), (2, 4), (2, 3)),
])
def test_csa_key_count_follows_stride_arithmetic(hw, strides, expected):
  """ceil(n / low_stride) keys per axis; dw_down(high) lands on the same grid."""
  csa = heads.CrossScaleAttention(num_heads=HEADS, high_stride=strides[0],
                                  low_stride=strides[1])
  x = jax.ShapeDtypeStruct((B, *hw, D), jnp.float32)
  v = jax.eval_shape(lambda x: csa.init(_key(), x), x)
  out, w = jax.eval_shape(lambda v, x: csa.apply(v, x, return_attention=True), v, x)
  assert w.shape == (B, HEADS, hw[0] * hw[1], expected[0] * expected[1])
  assert out.shape == (B, hw[0] * hw[1], D)
  assert heads.key_grid(*hw, low_stride=strides[1]) == expected


def test_parameter_names_follow_the_paper(variables):
  csa = _paths(variables["csa"]["params"])
  for part in ("dw_high", "dw_low", "dw_down", "dw_refine", "fuse", "query",
               "key_value", "out"):
    assert f"block0/cross_scale_attention/{part}/kernel" in csa
  for name in ("input_proj/kernel", "block0/norm1/scale", "block0/norm2/scale",
               "block0/mlp/fc1/kernel", "block0/mlp/fc2/kernel", "norm/scale",
               "head/kernel"):
    assert name in csa
  std = _paths(variables["standard"]["params"])
  assert not any("cross_scale" in p or "dw_" in p or "fuse" in p for p in std)
  assert {p.replace("self_attention", "cross_scale_attention") for p in std} < set(csa)
  kernel = variables["csa"]["params"]["block0"]["cross_scale_attention"]["dw_low"]["kernel"]
  assert kernel.shape == (5, 5, 1, D)  # depth-wise: one input channel per group


def test_paper_size_shapes_via_eval_shape():
  """ResNet-50 width (2048) on a 7x7 map with the default (paper-size) heads."""
  f = {"c5": jax.ShapeDtypeStruct((B, 7, 7, 2048), jnp.float32),
       "pooled": jax.ShapeDtypeStruct((B, 2048), jnp.float32)}
  for kind in ("mlp", "cstp"):
    model = heads.make_projector(kind)
    v = jax.eval_shape(lambda f: model.init(_key(), f, train=False), f)
    out = jax.eval_shape(lambda v, f: model.apply(v, f, train=False), v, f)
    assert out.shape == (B, 128) and out.dtype == jnp.float32
  kernel = v["params"]["input_proj"]["kernel"]
  assert kernel.shape == (1, 1, 2048, 512)
  pred = heads.SimSiamPredictor()
  z = jax.ShapeDtypeStruct((B, 2048), jnp.float32)
  v = jax.eval_shape(lambda z: pred.init(_key(), z), z)
  assert v["params"]["fc1"]["kernel"].shape == (2048, 512)
  assert jax.eval_shape(lambda v, z: pred.apply(v, z), v, z).shape == (B, 2048)


def test_bf16_compute_fp32_params_and_outputs(variables):
  f = _features(7, 7, seed=5)
  for name in ("mlp", "csa"):
    model, ref = _heads(jnp.bfloat16)[name], _heads()[name]
    abstract = jax.eval_shape(lambda f: model.init(_key(), f, train=False), f)
    assert {x.dtype for x in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype("float32")}
    jaxpr = str(jax.make_jaxpr(lambda v, f: model.apply(v, f, train=False))(
        variables[name], f))
    assert "bf16" in jaxpr
    out = _apply(model, variables[name], f, train=False)
    assert out.dtype == jnp.float32
    want = _apply(ref, variables[name], f, train=False)
    np.testing.assert_allclose(out, want, atol=0.05 * float(jnp.abs(want).max()))


def test_mlp_batch_stats_update_in_train_mode(variables):
  model, v = _heads()["mlp"], variables["mlp"]
  _, new = _apply(model, v, _features(7, 7), train=True, mutable=["batch_stats"])
  old_mean = v["batch_stats"]["norm1"]["mean"]
  new_mean = new["batch_stats"]["norm1"]["mean"]
  assert new_mean.dtype == jnp.float32
  assert not np.allclose(old_mean, new_mean)
  assert not np.allclose(v["batch_stats"]["norm1"]["var"], new["batch_stats"]["norm1"]["var"])


@pytest.mark.parametrize("name", ["mlp", "csa", "standard"])
def test_gradient_reaches_every_parameter(variables, name):
  model, v = _heads()[name], variables[name]
  f = _features(7, 7, seed=7)
  r = _normal(11, (B, OUT))

  def loss(params):
    # train=True: BatchNorm normalizes with batch statistics (CsTP ignores it).
    out, _ = model.apply({**v, "params": params}, f, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out * r)

  grads = jax.jit(jax.grad(loss))(v["params"])
  dead = [p for p, g in traverse_util.flatten_dict(grads, sep="/").items()
          if not np.any(np.asarray(g) != 0)]
  assert not dead, f"no gradient reaches {dead}"


def test_bad_settings_fail_loudly():
  with pytest.raises(ValueError, match="projector must be one of"):
    heads.make_projector("transformer")
  with pytest.raises(ValueError, match="hidden_dim"):
    heads.make_projector("cstp", hidden_dim=8)
  x = jax.ShapeDtypeStruct((B, 7, 7, D), jnp.float32)
  bad = heads.CrossScaleAttention(num_heads=HEADS, high_stride=1, low_stride=4)
  with pytest.raises(ValueError, match="low_stride"):
    jax.eval_shape(lambda x: bad.init(_key(), x), x)
  bad = heads.CrossScaleTokenProjection(**CSTP_KW, attention="linear")
  with pytest.raises(ValueError, match="attention must be one of"):
    jax.eval_shape(lambda x: bad.init(_key(), x), x)
  mlp = heads.MLPProjector(hidden_dim=D)
  with pytest.raises(ValueError, match=r"pooled features \(B, C\)"):
    jax.eval_shape(lambda x: mlp.init(_key(), x), x)
