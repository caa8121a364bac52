"""Tests for medrep_jax.models.resnet and medrep_jax.models.unet."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medrep_jax.losses import segmentation as seg_losses
from medrep_jax.models import resnet, unet


def _key(seed=0):
  # rbg keys: XLA:CPU compiles threefry-based init programs ~10x slower.
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  # NumPy data: eager jax.random calls would compile threefry (~2 s on CPU).
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(_key(), jnp.zeros(shape), train=False))


def _init(model, x):
  return jax.jit(lambda x: model.init(_key(), x, train=False))(x)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _shapes(model, shape):
  variables = _abstract_init(model, shape)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  return {k: v.shape for k, v in out.items()}


@pytest.mark.parametrize("name,widths", [
    ("resnet18", (64, 64, 128, 256, 512)),
    ("resnet50", (64, 256, 512, 1024, 2048)),
])
def test_resnet_feature_shapes_imagenet_stem(name, widths):
  shapes = _shapes(resnet.get_resnet(name), (2, 96, 96, 3))
  for i, (stride, c) in enumerate(zip((2, 4, 8, 16, 32), widths)):
    assert shapes[f"c{i + 1}"] == (2, 96 // stride, 96 // stride, c)
  assert shapes["pooled"] == (2, widths[-1])
  assert resnet.get_resnet(name).feature_dim == widths[-1] == resnet.feature_dim(name)


def test_resnet_small_input_stem():
  shapes = _shapes(resnet.resnet18(small_input=True), (2, 32, 32, 1))
  assert [shapes[f"c{i}"][1] for i in range(1, 6)] == [32, 32, 16, 8, 4]


def test_parameter_counts_match_torchvision_without_fc():
  assert _count(_abstract_init(resnet.resnet50(), (1, 96, 96, 3))["params"]) == 23_508_032
  assert _count(_abstract_init(resnet.resnet18(), (1, 96, 96, 3))["params"]) == 11_176_512
  assert _count(_abstract_init(resnet.resnet34(), (1, 96, 96, 3))["params"]) == 21_284_672


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="resnet50"):
    resnet.get_resnet("resnet51")
  with pytest.raises(ValueError, match="unet_encoder"):
    unet.get_encoder("vit")


def test_group_count():
  assert resnet.group_count(64) == 32
  assert resnet.group_count(16) == 16
  assert resnet.group_count(24) == 24
  assert resnet.group_count(48) == 24
  assert resnet.group_count(3) == 3


# One real init shared by the tests below: XLA:CPU init programs are the
# slowest part to compile, while applies compile quickly.
_TINY = resnet.resnet_tiny(small_input=True)


@pytest.fixture(scope="module")
def tiny_vars():
  """Real variables of _TINY (resnet_tiny, small-input stem)."""
  return _init(_TINY, jnp.zeros((1, 32, 32, 3)))


def test_zero_init_last_norm_scale(tiny_vars):
  params = tiny_vars["params"]
  np.testing.assert_array_equal(params["layer2_0"]["norm2"]["scale"], 0.0)
  np.testing.assert_array_equal(params["layer2_0"]["norm1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["layer2_0"]["proj_norm"]["scale"], 1.0)
  block = resnet.BasicBlock(filters=8, zero_init_last=False)
  real = _init(block, jnp.zeros((1, 8, 8, 8)))["params"]
  np.testing.assert_array_equal(real["norm2"]["scale"], 1.0)


def test_groupnorm_variant_runs_without_batch_stats(tiny_vars):
  model = resnet.resnet_tiny(norm="group", small_input=True)
  variables = _abstract_init(model, (1, 32, 32, 3))
  assert "batch_stats" not in variables
  # GroupNorm and BatchNorm have the same (scale, bias) parameters.
  params = tiny_vars["params"]
  chex.assert_trees_all_equal_shapes_and_dtypes(variables["params"], params)
  x = _normal(1, (2, 32, 32, 3))
  out = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True))(params, x)
  assert out["c5"].shape == (2, 4, 4, 128)
  assert np.isfinite(np.asarray(out["pooled"])).all()
  # GroupNorm normalizes each example on its own: the batch does not matter.
  single = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True))(params, x[:1])
  np.testing.assert_allclose(single["pooled"], out["pooled"][:1], rtol=1e-4, atol=1e-5)


def test_batchnorm_stats_update_only_in_train_mode(tiny_vars):
  variables = tiny_vars
  x = 3.0 + 2.0 * _normal(1, (4, 32, 32, 3))
  apply = jax.jit(lambda v, x, train: _TINY.apply(v, x, train=train, mutable=["batch_stats"]),
                  static_argnums=2)
  _, upd_train = apply(variables, x, True)
  _, upd_eval = apply(variables, x, False)
  old = variables["batch_stats"]["stem_norm"]["mean"]
  new = upd_train["batch_stats"]["stem_norm"]["mean"]
  chex.assert_trees_all_equal(upd_eval["batch_stats"], variables["batch_stats"])
  # momentum 0.9: new = 0.9 * old + 0.1 * (batch mean of the stem conv output).
  kernel = variables["params"]["stem_conv"]["kernel"]
  conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = 0.9 * old + 0.1 * conv.mean(axis=(0, 1, 2))
  assert not np.allclose(old, expected)
  np.testing.assert_allclose(new, expected, rtol=1e-4, atol=1e-4)


def test_bf16_activations_fp32_params_and_stats(tiny_vars):
  model = resnet.resnet_tiny(small_input=True, dtype=jnp.bfloat16)
  x = _normal(1, (2, 32, 32, 3))
  variables = tiny_vars
  chex.assert_trees_all_equal_shapes_and_dtypes(
      variables, _abstract_init(model, (1, 32, 32, 3)))
  out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  for k in ("c1", "c3", "c5", "pooled"):
    assert out[k].dtype == jnp.bfloat16, k
  for leaf in jax.tree_util.tree_leaves(upd["batch_stats"]):
    assert leaf.dtype == jnp.float32
  ref, ref_upd = jax.jit(lambda v, x: _TINY.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  chex.assert_trees_all_close(upd, ref_upd, rtol=0.05, atol=0.05)


def test_batchnorm_under_sharded_jit_uses_global_batch_stats(tiny_vars):
  variables = tiny_vars
  scale = jnp.arange(1.0, 9.0)[:, None, None, None]
  x = _normal(2, (8, 32, 32, 3)) * scale
  step = jax.jit(lambda v, x: _TINY.apply(v, x, train=True, mutable=["batch_stats"]))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  (out_ref, upd_ref), (out_sh, upd_sh) = step(variables, x), step(variables, x_sharded)
  chex.assert_trees_all_close(upd_ref, upd_sh, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_ref["pooled"], out_sh["pooled"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model,size", [
    (unet.UNet(num_classes=2, encoder="resnet_tiny"), 96),
    (unet.UNet(num_classes=1, encoder=resnet.resnet18(small_input=True),
               upsample="transpose"), 32),
    (unet.UNet(num_classes=3, encoder="resnet50"), 96),
    (unet.UNet(num_classes=3, encoder=unet.UNetEncoder((8, 16, 32)), decoder_widths=(16, 8),
               upsample="transpose"), 32),
    (unet.UNet(num_classes=1, encoder=unet.UNetEncoder((8, 16, 32, 64)),
               decoder_widths=(32, 16, 8), upsample="transpose"), 30),
])
def test_segmentation_output_shape_and_encoder_name(model, size):
  shape = (2, size, size, 3)
  variables = _abstract_init(model, shape)
  assert set(variables["params"]) == {"encoder", "decoder"}
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  assert out.shape == (2, size, size, model.num_classes)
  assert out.dtype == jnp.float32


def test_resnet_unet_encoder_subtree_matches_resnet_params():
  seg = _abstract_init(unet.UNet(num_classes=1, encoder="resnet18"), (1, 96, 96, 3))
  enc = _abstract_init(resnet.resnet18(), (1, 96, 96, 3))
  for col in ("params", "batch_stats"):
    chex.assert_trees_all_equal_shapes_and_dtypes(seg[col]["encoder"], enc[col])


def test_decoder_widths_are_used_and_checked():
  model = unet.UNet(num_classes=2, encoder=resnet.get_resnet("resnet_tiny", small_input=True),
                    decoder_widths=(32, 16, 8, 4, 99))
  params = _abstract_init(model, (1, 32, 32, 3))["params"]["decoder"]
  assert [params[f"block{i}"]["conv2"]["kernel"].shape[-1] for i in range(4)] == [32, 16, 8, 4]
  assert "block4" not in params  # small-input c1 is full resolution: 4 steps.
  assert params["logits"]["kernel"].shape == (1, 1, 4, 2)
  with pytest.raises(ValueError, match="widths"):
    _abstract_init(unet.UNet(num_classes=2, encoder="resnet_tiny",
                             decoder_widths=(8, 8)), (1, 96, 96, 1))


def test_classifier_names_features_and_cam(tiny_vars):
  model = unet.Classifier(num_classes=3,
                          encoder=unet.get_encoder("resnet_tiny", small_input=True))
  abstract = _abstract_init(model, (1, 32, 32, 3))
  assert set(abstract["params"]) == {"encoder", "head"}
  rng = np.random.default_rng(0)
  variables = {
      "params": {"encoder": tiny_vars["params"],
                 "head": {"kernel": jnp.asarray(rng.normal(size=(128, 3)), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}},
      "batch_stats": {"encoder": tiny_vars["batch_stats"]}}
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, abstract)
  x = _normal(4, (2, 32, 32, 3))
  logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))(
      variables, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  fmap = unet.last_feature_map(feats)
  assert fmap.shape == (2, 4, 4, 128)
  # Linear head on a GAP: the CAM's spatial mean plus bias equals the logits.
  cam = fmap @ variables["params"]["head"]["kernel"]
  np.testing.assert_allclose(cam.mean(axis=(1, 2)) + variables["params"]["head"]["bias"],
                             logits, rtol=1e-4, atol=1e-4)
  by_name = _abstract_init(unet.Classifier(num_classes=5, encoder="unet_encoder"), (1, 32, 32, 1))
  assert set(by_name["params"]) == {"encoder", "head"}
  assert by_name["params"]["head"]["kernel"].shape == (256, 5)


def test_unet_encoder_features():
  enc = unet.get_encoder("unet_encoder", widths=(8, 16, 32))
  shapes = _shapes(enc, (2, 32, 32, 1))
  assert shapes == {"c1": (2, 32, 32, 8), "c2": (2, 16, 16, 16), "c3": (2, 8, 8, 32),
                    "pooled": (2, 32)}
  assert enc.feature_dim == 32


def test_tiny_unet_overfits_tiny_batch():
  model = unet.UNet(num_classes=1, encoder=unet.UNetEncoder((8, 16)), decoder_widths=(8,),
                    upsample="transpose")
  x = _normal(5, (4, 32, 32, 1))
  yy, xx = np.mgrid[:32, :32]
  centers = [(8, 8), (20, 12), (12, 22), (24, 24)]
  mask = np.stack([((yy - cy) ** 2 + (xx - cx) ** 2 < 36) for cy, cx in centers]).astype(np.float32)
  x = x + 2.0 * mask[..., None]
  variables = _init(model, x)
  tx = optax.adam(1e-2)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return seg_losses.bce_loss(logits, mask), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for _ in range(100):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_classifier_head_norm_standardizes_pooled_features(tiny_vars):
  """head_norm: a BatchNorm without scale/bias on the pooled features (linear probing)."""
  model = unet.Classifier(num_classes=2, encoder=unet.get_encoder("resnet_tiny", small_input=True),
                          train_encoder=False, head_norm=True)
  x = _normal(7, (16, 32, 32, 3)) * 3.0 + 1.0
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  assert "head_norm" not in variables["params"]  # no affine parameters
  assert set(variables["batch_stats"]["head_norm"]) == {"mean", "var"}
  _, feats = model.apply(variables, x, train=False, return_features=True)
  pooled = np.asarray(feats["pooled"], np.float64)
  (logits, _), updates = model.apply(variables, x, train=True, return_features=True,
                                     mutable=["batch_stats"])
  z = (pooled - pooled.mean(0)) / np.sqrt(pooled.var(0) + 1e-6)
  head = variables["params"]["head"]
  np.testing.assert_allclose(np.asarray(logits), z @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["head_norm"]["mean"]),
                             0.1 * pooled.mean(0), rtol=1e-4, atol=1e-6)
