"""UNet++ (models/unetpp.py) and its deep-supervision loss (losses/unetpp.py).

Tiny widths and 16 px inputs; every numeric forward is one jitted program (XLA:CPU
compile time dominates), structure checks trace with jax.eval_shape only.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.losses import unetpp as ds_losses
from medrep_jax.models.unet import UNetEncoder
from medrep_jax.models.unetpp import UNetPlusPlus

W3, W4 = (4, 8, 16), (4, 8, 16, 32)
KEY = jax.random.key(0)


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: (tuple(a.shape), a.dtype), tree)


def _init_shapes(model, *args, **kw):
  return jax.eval_shape(lambda: model.init(KEY, *args, train=False, **kw))["params"]


def _x(seed, shape=(2, 16, 16, 1)):
  return jax.random.normal(jax.random.key(seed), shape)


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_node_wiring_concatenates_j_plus_1_inputs(upsample):
  params = _init_shapes(UNetPlusPlus(1, W4, norm="none", upsample=upsample), _x(0))
  d = len(W4)
  nodes = {k for k in params if k.startswith("node_")}
  assert nodes == {f"node_{i}_{j}" for j in range(1, d) for i in range(d - j)}
  for i in range(d - 1):
    for j in range(1, d - i):
      c_in = params[f"node_{i}_{j}"]["conv1"]["kernel"].shape[2]
      up_width = W4[i] if upsample == "transpose" else W4[i + 1]
      assert c_in == j * W4[i] + up_width, (i, j, c_in)  # j same-level nodes + U(X_{i+1,j-1})
      assert params[f"node_{i}_{j}"]["conv2"]["kernel"].shape[2:] == (W4[i], W4[i])
      if upsample == "transpose":
        assert params[f"up_{i}_{j}"]["kernel"].shape == (2, 2, W4[i + 1], W4[i])
  assert sorted(k for k in params if k.startswith("head_")) == ["head_1", "head_2", "head_3"]
  # the encoder column is unet.UNetEncoder's tree: its pretrained params copy by path
  enc = jax.eval_shape(lambda: UNetEncoder(W4, norm="none").init(KEY, _x(0), False))
  assert _shapes(params["encoder"]) == _shapes(enc["params"])


@pytest.mark.parametrize("skip_mode", ["source", "none"])
def test_param_tree_is_the_same_whichever_method_initialises(skip_mode):
  model = UNetPlusPlus(1, W3, norm="batch", latent_channels=3, skip_mode=skip_mode)
  x = _x(0)
  full = jax.eval_shape(lambda: model.init(KEY, x, train=False))
  by_encode = jax.eval_shape(lambda: model.init(KEY, x, train=False, method="encode"))
  assert _shapes(by_encode) == _shapes(full)
  z, skips = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, method="encode"), full)
  by_decode = jax.eval_shape(lambda z, s: model.init(KEY, z, s, train=False,
                                                     method="decode"), z, skips)["params"]
  assert set(full["params"]) - set(by_decode) == {"encoder", "to_latent"}
  for name, sub in by_decode.items():
    assert _shapes(sub) == _shapes(full["params"][name]), name


@pytest.fixture(scope="module")
def source_model():
  model = UNetPlusPlus(2, W3, norm="group", latent_channels=3)
  variables = jax.jit(lambda k: model.init(k, _x(0), train=False))(KEY)
  return model, variables


def test_deep_supervision_heads_pruning_and_flops(source_model):
  model, v = source_model
  x = _x(1)
  compiled = {}
  for level in (None, 1, 2):
    fn = jax.jit(lambda v, x, level=level: model.apply(v, x, train=False, prune_level=level))
    compiled[level] = fn.lower(v, x).compile()
  heads = compiled[None](v, x)
  assert isinstance(heads, list) and len(heads) == len(W3) - 1
  for h in heads:
    assert h.shape == (2, 16, 16, 2) and h.dtype == jnp.float32
  assert not np.allclose(heads[0], heads[1])
  for level in (1, 2):
    np.testing.assert_allclose(compiled[level](v, x), heads[level - 1], rtol=1e-5, atol=1e-6)
  flops = {k: _flops(c) for k, c in compiled.items()}
  assert flops[1] < 0.7 * flops[2] and flops[2] < flops[None], flops


def test_encode_decode_equals_call_source(source_model):
  model, v = source_model
  x1, x2 = _x(1), _x(2)
  call = jax.jit(lambda v, x: model.apply(v, x, train=False))
  encode = jax.jit(lambda v, x: model.apply(v, x, train=False, method="encode"))
  decode = jax.jit(lambda v, z, s: model.apply(v, z, s, train=False, method="decode"))
  z1, s1 = encode(v, x1)
  _, s2 = encode(v, x2)
  assert z1.shape == (2, 4, 4, 3) and z1.dtype == jnp.float32
  assert [s.shape for s in s1] == [(2, 16, 16, 4), (2, 8, 8, 8)]
  for a, b in zip(decode(v, z1, s1), call(v, x1)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # with skips from another input the output changes: the skips carry information
  assert not np.allclose(decode(v, z1, s2)[-1], decode(v, z1, s1)[-1], atol=1e-3)


def test_skip_mode_none_decodes_from_the_latent_alone():
  model = UNetPlusPlus(1, W3, norm="group", latent_channels=3, skip_mode="none",
                       upsample="transpose")
  v = jax.jit(lambda k: model.init(k, _x(0), train=False))(KEY)
  x1, x2 = _x(1), _x(2)
  call = jax.jit(lambda v, x, level=None: model.apply(v, x, train=False, prune_level=level),
                 static_argnums=2)
  encode = jax.jit(lambda v, x: model.apply(v, x, train=False, method="encode"))
  decode = jax.jit(lambda v, z, s: model.apply(v, z, s, train=False, method="decode"))
  (z1, s1), (z2, s2) = encode(v, x1), encode(v, x2)
  full = call(v, x1)
  ref = decode(v, z1, s1)
  for a, b in zip(ref, full):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # skips of another input, or none at all: the same output
  for a, b in zip(decode(v, z1, s2), ref):
    np.testing.assert_array_equal(a, b)
  no_skips = jax.jit(lambda v, z: model.apply(v, z, train=False, method="decode"))(v, z1)
  np.testing.assert_allclose(no_skips[-1], ref[-1], rtol=1e-5, atol=1e-5)
  # ...while every head depends on the latent, pruned ones included
  other = decode(v, z2, s1)
  assert all(not np.allclose(a, b, atol=1e-4) for a, b in zip(other, ref))
  np.testing.assert_allclose(call(v, x1, 1), full[0], rtol=1e-5, atol=1e-6)
  assert {"gen_0", "gen_1", "gen_up_0", "gen_up_1"} <= set(v["params"])


def test_single_head_without_deep_supervision_and_prune_errors():
  model = UNetPlusPlus(3, W3, norm="none", deep_supervision=False)
  x = _x(0)
  params = _init_shapes(model, x)
  assert [k for k in params if k.startswith("head_")] == ["head_2"]
  apply = lambda level=None: jax.eval_shape(
      lambda p: model.apply({"params": p}, x, train=False, prune_level=level), params)
  out = apply()
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="deep_supervision=True"):
    apply(1)
  with pytest.raises(ValueError, match=r"prune_level must be in 1\.\.2"):
    apply(3)


def test_batch_norm_training_and_mixed_precision():
  model = UNetPlusPlus(1, W3, norm="batch", dtype=jnp.bfloat16)
  x = _x(0)
  variables = jax.eval_shape(lambda: model.init(KEY, x, train=False))
  assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  heads, updates = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
  assert [h.dtype for h in heads] == [jnp.float32, jnp.float32]
  assert set(updates["batch_stats"]) == set(variables["batch_stats"])
  z, skips = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, method="encode"), variables)
  assert z.dtype == jnp.float32 and z.shape == (2, 4, 4, 16)
  assert skips[0].dtype == jnp.bfloat16


def test_bad_inputs_raise_value_errors_naming_the_shape():
  model = UNetPlusPlus(1, W3, norm="none")
  with pytest.raises(ValueError, match=r"divisible by 2\^\(depth-1\) = 4.*\(2, 18, 16, 1\)"):
    _init_shapes(model, _x(0, (2, 18, 16, 1)))
  with pytest.raises(ValueError, match=r"\(2, 16, 16\)"):
    _init_shapes(model, jnp.zeros((2, 16, 16)))
  variables = {"params": _init_shapes(model, _x(0))}
  with pytest.raises(ValueError, match=r"1 input channels.*\(2, 16, 16, 3\)"):
    jax.eval_shape(lambda v: model.apply(v, _x(0, (2, 16, 16, 3)), train=False), variables)
  z, skips = jax.eval_shape(
      lambda v: model.apply(v, _x(0), train=False, method="encode"), variables)
  dec = lambda *a: jax.eval_shape(
      lambda v, *a: model.apply(v, *a, train=False, method="decode"), variables, *a)
  with pytest.raises(ValueError, match=r"skips X_\(i,0\) of shapes.*got None"):
    dec(z)
  with pytest.raises(ValueError, match=r"got \[\(2, 16, 16, 4\)\]"):
    dec(z, skips[:1])
  with pytest.raises(ValueError, match=r"latent \(B, h, w, 16\), got shape \(2, 4, 4, 3\)"):
    dec(jnp.zeros((2, 4, 4, 3)), skips)
  with pytest.raises(ValueError, match="skip_mode"):
    _init_shapes(UNetPlusPlus(1, W3, skip_mode="off"), _x(0))


# ------------------------------------------------------------------ loss
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_deep_supervision_loss_matches_numpy(kind):
  rng = np.random.default_rng(0)
  target = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  heads = [rng.normal(size=target.shape).astype(np.float32) for _ in range(3)]
  w, ex = [0.2, 0.3, 0.5], np.array([1.0, 0.0, 2.0], np.float32)
  err = (lambda d: np.abs(d)) if kind == "l1" else np.square
  per_head = [np.sum(err(h - target).mean(axis=(1, 2, 3)) * ex) / ex.sum() for h in heads]
  loss, terms = ds_losses.deep_supervision_loss([jnp.asarray(h) for h in heads], target, w,
                                                kind, example_weights=ex)
  np.testing.assert_allclose(loss, np.dot(w, per_head), rtol=1e-5)
  np.testing.assert_allclose([terms[f"loss_head{j}"] for j in (1, 2, 3)], per_head, rtol=1e-5)
  mean_loss, _ = ds_losses.deep_supervision_loss(heads, target, kind=kind)
  per_head = [err(h - target).mean() for h in heads]
  np.testing.assert_allclose(mean_loss, np.mean(per_head), rtol=1e-5)
  with pytest.raises(ValueError, match="2 weights for 3 heads"):
    ds_losses.deep_supervision_loss(heads, target, [1.0, 1.0], kind)


def test_deep_supervision_loss_bce_dice_matches_numpy():
  rng = np.random.default_rng(1)
  mask = (rng.random((2, 4, 4)) > 0.5).astype(np.float32)
  heads = [rng.normal(size=(2, 4, 4, 1)).astype(np.float32) for _ in range(2)]
  ref = []
  for h in heads:
    p, t = 1 / (1 + np.exp(-h[..., 0])), mask
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    dice = (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    ref.append(0.5 * bce + np.mean(1 - dice))
  loss, _ = ds_losses.deep_supervision_loss(heads, mask, [1.0, 3.0], "bce_dice")
  np.testing.assert_allclose(loss, ref[0] + 3 * ref[1], rtol=1e-5)
  with pytest.raises(ValueError, match="one of"):
    ds_losses.deep_supervision_loss(heads, mask, kind="ssim")
