"""Tests for medrep_jax.models.densenet (DenseNet-121) and its registration as an encoder."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from medrep_jax.methods.dcl_cstp import ContrastiveNet
from medrep_jax.models import densenet, heads, unet


def _key(seed=0):
  # rbg keys: XLA:CPU compiles threefry-based init programs ~10x slower.
  return jax.random.key(seed, impl="rbg")


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(_key(), jnp.zeros(shape), train=False))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract_apply(model, shape):
  variables = _abstract_init(model, shape)
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def test_parameter_count_matches_torchvision_without_classifier():
  # torchvision densenet121: 7,978,856 parameters - 1024 * 1000 + 1000 classifier.
  variables = _abstract_init(densenet.densenet121(), (1, 224, 224, 3))
  assert _count(variables["params"]) == 7_978_856 - 1_025_000 == 6_953_856
  # Running mean and variance of every BatchNorm: as many as their scales and biases.
  assert _count(variables["batch_stats"]) == 83_648
  assert len([k for k in variables["params"] if k.startswith("block")]) == 6 + 12 + 24 + 16
  assert densenet.DENSENET_NAMES == ("densenet121",)


def test_feature_shapes_imagenet_stem():
  shapes = {k: v.shape for k, v in _abstract_apply(densenet.densenet121(),
                                                    (2, 224, 224, 3)).items()}
  widths = (64, 256, 512, 1024, 1024)
  for i, (stride, c) in enumerate(zip((2, 4, 8, 16, 32), widths)):
    assert shapes[f"c{i + 1}"] == (2, 224 // stride, 224 // stride, c)
  assert shapes["pooled"] == (2, 1024)
  assert densenet.densenet121().feature_dim == 1024


def test_feature_shapes_small_input():
  shapes = {k: v.shape for k, v in _abstract_apply(densenet.densenet121(small_input=True),
                                                    (2, 32, 32, 1)).items()}
  assert [shapes[f"c{i}"][1:] for i in range(1, 6)] == [
      (32, 32, 64), (32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 1024)]
  # Only the stem differs from the ImageNet layout: 3x3 instead of 7x7 kernels.
  small = _abstract_init(densenet.densenet121(small_input=True), (1, 32, 32, 3))
  assert _count(small["params"]) == 6_953_856 - 64 * 3 * (49 - 9)


def test_registered_encoder_and_bad_name_lists_it():
  assert "densenet121" in unet.ENCODER_NAMES
  enc = unet.get_encoder("densenet121", norm="group", small_input=True)
  assert isinstance(enc, densenet.DenseNet) and enc.norm == "group" and enc.small_input
  cfg = mlc.ConfigDict(dict(encoder="densenet121", norm="batch", small_input=True))
  enc = unet.encoder_from_config(cfg, jnp.bfloat16, remat=True)
  assert isinstance(enc, densenet.DenseNet)
  assert (enc.small_input, enc.remat, enc.dtype) == (True, True, jnp.bfloat16)
  with pytest.raises(ValueError, match="densenet121"):
    unet.get_encoder("densenet122")
  with pytest.raises(ValueError, match="densenet121"):
    densenet.get_densenet("densenet122")


def test_classifier_logits_and_cam_map():
  model = unet.Classifier(num_classes=5, encoder="densenet121")
  variables = _abstract_init(model, (2, 64, 64, 3))
  assert variables["params"]["head"]["kernel"].shape == (1024, 5)
  logits, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_features=True), variables,
      jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert unet.last_feature_map(feats).shape == (2, 2, 2, 1024)


@pytest.mark.parametrize("encoder,size", [
    ("densenet121", 64),
    (densenet.densenet121(small_input=True), 32),
])
def test_unet_segmenter_output_shape(encoder, size):
  model = unet.UNet(num_classes=3, encoder=encoder)
  out = _abstract_apply(model, (2, size, size, 1))
  assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32
  assert set(_abstract_init(model, (2, size, size, 1))["params"]) == {"encoder", "decoder"}


def test_contrastive_net_takes_densenet():
  for kind, kw in (("mlp", dict(hidden_dim=32, out_dim=16)),
                   ("cstp", dict(embed_dim=16, out_dim=8, num_heads=2))):
    net = ContrastiveNet(encoder=densenet.densenet121(small_input=True),
                         projector=heads.make_projector(kind, **kw))
    z = _abstract_apply(net, (2, 32, 32, 3))
    assert z.shape == (2, kw["out_dim"])


def test_remat_and_group_norm_keep_parameters():
  shape = (1, 32, 32, 3)
  base = _abstract_init(densenet.densenet121(small_input=True), shape)
  remat = densenet.densenet121(small_input=True, remat=True)
  remat_vars = _abstract_init(remat, shape)
  assert (jax.tree_util.tree_structure(remat_vars) == jax.tree_util.tree_structure(base))
  # The rematerialized layers trace under a gradient in train mode.
  grads = jax.eval_shape(jax.grad(lambda p, s: remat.apply(
      {"params": p, "batch_stats": s}, jnp.zeros(shape), train=True,
      mutable=["batch_stats"])[0]["pooled"].sum()), remat_vars["params"],
      remat_vars["batch_stats"])
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(base["params"])
  group = _abstract_init(densenet.densenet121(small_input=True, norm="group"), shape)
  assert "batch_stats" not in group
  assert _count(group["params"]) == _count(base["params"])


def test_train_forward_updates_batch_stats():
  model = densenet.densenet121(small_input=True)
  x = jnp.asarray(3.0 + 2.0 * np.random.default_rng(0).normal(size=(2, 32, 32, 3)),
                  jnp.float32)
  # He-normal kernels and the init's norm values from NumPy: compiling `model.init` as
  # well would double this test's time (compiling, not running, is most of it on CPU).
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(std * rng.normal(size=leaf.shape), jnp.float32)
    return (jnp.ones if "scale" in name or "var" in name else jnp.zeros)(leaf.shape)

  variables = jax.tree_util.tree_map_with_path(fill, _abstract_init(model, x.shape))
  out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert out["pooled"].shape == (2, 1024)
  assert np.isfinite(np.asarray(out["pooled"])).all()
  assert (np.asarray(out["c5"]) >= 0).all()  # after the final norm-ReLU
  np.testing.assert_allclose(out["pooled"], np.asarray(out["c5"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  old, new = variables["batch_stats"], upd["batch_stats"]
  assert set(new) == set(old)
  # Train mode moves the running statistics of every norm, shallow to deep.
  for name in ("stem_norm", "block1_0", "transition1_norm", "block4_15", "final_norm"):
    a, b = jax.tree_util.tree_leaves(old[name]), jax.tree_util.tree_leaves(new[name])
    assert any(not np.allclose(u, v) for u, v in zip(a, b)), name
