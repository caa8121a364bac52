"""3-D encoders, 3-D CAMs and 3-D heatmaps (CAMContrast Sec. 4.7, ADNI volumes).

The 3-D encoders are the 2-D modules with ``spatial_dims=3``; the 2-D results are pinned
by tests/test_models.py, test_densenet.py, test_conv_grad.py and test_camcontrast.py.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from medrep_jax.methods.camcontrast_parts import heatmaps
from medrep_jax.models import cam, conv_grad, resnet, unet


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")  # threefry init programs compile slowly on CPU


def _abstract(model, shape):
  """(abstract variables, {feature: shape}) without compiling anything."""
  variables = jax.eval_shape(lambda: model.init(_key(), jnp.zeros(shape), train=False))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  return variables, {k: v.shape for k, v in out.items()}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _paths(tree):
  return sorted("/".join(str(k.key) for k in p) for p, _ in
                jax.tree_util.tree_flatten_with_path(tree)[0])


# ------------------------------------------------------------------------ encoders
VOLUME = (2, 32, 16, 24, 1)  # NDHWC, anisotropic so every axis is checked


@pytest.mark.parametrize("name,kw,strides", [
    ("resnet_tiny_3d", {}, {"c1": 2, "c2": 4, "c3": 8, "c4": 16, "c5": 32}),
    ("resnet_tiny_3d", {"small_input": True}, {"c1": 1, "c2": 1, "c3": 2, "c4": 4, "c5": 8}),
    ("resnet18_3d", {"norm": "group"}, {"c1": 2, "c2": 4, "c3": 8, "c4": 16, "c5": 32}),
    ("resnet50_3d", {}, {"c1": 2, "c2": 4, "c3": 8, "c4": 16, "c5": 32}),
    ("unet_encoder_3d", {"widths": (4, 8, 16)}, {"c1": 1, "c2": 2, "c3": 4}),
])
def test_3d_encoder_shapes_and_strides(name, kw, strides):
  assert name in unet.ENCODER_NAMES
  width = {} if name.startswith("unet") else {"num_filters": 4}
  enc = unet.get_encoder(name, **width, **kw)
  assert enc.spatial_dims == 3
  _, shapes = _abstract(enc, VOLUME)
  assert set(shapes) == {*strides, "pooled"}
  for key, s in strides.items():  # padded convs and pools round up: ceil(size / stride)
    assert shapes[key][:4] == (2, *(math.ceil(n / s) for n in VOLUME[1:4])), (key, shapes)
  assert shapes["pooled"] == (2, enc.feature_dim)
  assert shapes[unet.feature_keys(shapes)[-1]][-1] == enc.feature_dim


def test_3d_is_the_2d_module_with_cubic_kernels():
  """Same parameter names; every spatial kernel gains one axis of the same size."""
  v2, _ = _abstract(resnet.get_resnet("resnet_tiny", num_filters=4), (1, 32, 32, 1))
  v3, _ = _abstract(resnet.get_resnet("resnet_tiny_3d", num_filters=4), (1, 32, 32, 32, 1))
  assert _paths(v2) == _paths(v3)
  for a, b in zip(jax.tree_util.tree_leaves(v2), jax.tree_util.tree_leaves(v3)):
    assert b.shape == (a.shape[:1] + a.shape if a.ndim == 4 else a.shape)


def _conv_norm(k, c_in, c_out):  # a bias-free k^3 conv + BatchNorm (scale, bias)
  return k ** 3 * c_in * c_out + 2 * c_out


def test_3d_parameter_counts_match_hand_counts():
  w = 4  # resnet_tiny_3d, small stem, 1 channel: one basic block per stage
  hand = _conv_norm(3, 1, w)  # stem
  hand += 2 * _conv_norm(3, w, w)  # layer1_0, identity shortcut
  for c in (w, 2 * w, 4 * w):  # layer2..4: stride 2, 1x1x1 projection shortcut
    hand += _conv_norm(3, c, 2 * c) + _conv_norm(3, 2 * c, 2 * c) + _conv_norm(1, c, 2 * c)
  v, _ = _abstract(unet.get_encoder("resnet_tiny_3d", num_filters=w, small_input=True),
                   (1, 8, 8, 8, 1))
  assert _count(v["params"]) == hand == 56436
  # ImageNet stem: 7x7x7 instead of 3x3x3
  v, _ = _abstract(unet.get_encoder("resnet_tiny_3d", num_filters=w), (1, 8, 8, 8, 1))
  assert _count(v["params"]) == hand + (7 ** 3 - 3 ** 3) * w
  # U-Net encoder: two 3x3x3 conv-BN per level
  hand = sum(_conv_norm(3, a, b) + _conv_norm(3, b, b) for a, b in ((1, 4), (4, 8)))
  v, _ = _abstract(unet.get_encoder("unet_encoder_3d", widths=(4, 8)), (1, 8, 8, 8, 1))
  assert _count(v["params"]) == hand


def test_3d_names_config_and_errors():
  cfg = mlc.ConfigDict(dict(encoder="resnet18_3d", norm="group", small_input=True, width=8))
  enc = unet.encoder_from_config(cfg)
  assert (enc.spatial_dims, enc.num_filters, enc.small_input, enc.stage_sizes) == (
      3, 8, True, (2, 2, 2, 2))
  cfg = mlc.ConfigDict(dict(encoder="unet_encoder_3d", norm="batch", unet_widths=(4, 8)))
  assert unet.encoder_from_config(cfg).spatial_dims == 3
  cfg.width = 8
  with pytest.raises(ValueError, match="not a ResNet"):
    unet.encoder_from_config(cfg)
  assert unet.get_encoder("resnet18").spatial_dims == 2  # 2-D names stay 2-D
  with pytest.raises(ValueError, match="3-D encoder"):
    unet.get_encoder("resnet18_3d", spatial_dims=2)
  with pytest.raises(ValueError, match="resnet18_3d"):
    unet.get_encoder("resnet19_3d")
  with pytest.raises(ValueError, match="NHWC images"):
    _abstract(unet.get_encoder("resnet_tiny"), (1, 8, 8, 8, 1))
  with pytest.raises(ValueError, match="NDHWC volumes"):
    _abstract(unet.get_encoder("unet_encoder_3d"), (1, 8, 8, 1))


def test_3d_unet_decoder_reaches_input_size():
  model = unet.UNet(1, encoder=unet.get_encoder("resnet_tiny_3d", num_filters=4),
                    decoder_widths=(8, 8, 8, 4, 4), norm="group")
  shape = (1, 16, 8, 16, 1)
  variables = jax.eval_shape(lambda: model.init(_key(), jnp.zeros(shape), train=False))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  assert out.shape == shape
  with pytest.raises(ValueError, match="2-D only"):
    jax.eval_shape(lambda: unet.UNet(1, encoder=unet.get_encoder("unet_encoder_3d"),
                                     upsample="transpose").init(_key(), jnp.zeros(shape),
                                                                train=False))


@pytest.mark.parametrize("mode", ["matmul", "xla"])
def test_3d_conv_gradients_match_xla(monkeypatch, mode):
  """A strided 3-D conv takes conv_grad's custom VJP (per-tap weight gradient, stride-phase
  input gradient) when forced to "matmul", lax unchanged with "xla"; same gradients."""
  monkeypatch.setenv("MEDREP_CONV_WEIGHT_GRAD", mode)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 5, 4, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 8)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NDHWC", "DHWIO", "NDHWC"))
  args = ((2, 2, 2), ((1, 1),) * 3)

  def loss(conv, x, w):
    return jnp.sum(conv(x, w, *args, dimension_numbers=dn) ** 2)

  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda x, w: loss(conv_grad.conv_general_dilated, x, w), (0, 1)))(x, w))
  # XLA's input gradient of a strided conv is an lhs-dilated conv; the phase form has none
  assert ("lhs_dilation=(2, 2, 2)" in jaxpr) == (mode == "xla")
  got = jax.grad(loss, (1, 2))(conv_grad.conv_general_dilated, x, w)
  want = jax.grad(loss, (1, 2))(jax.lax.conv_general_dilated, x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(np.abs(b).max()))


# ---------------------------------------------------------------------------- CAMs
def test_3d_cam_matches_numpy_reference():
  rng = np.random.default_rng(1)
  fmap = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
  w = rng.normal(size=(6, 2)).astype(np.float32)
  ref = np.zeros(fmap.shape[:4] + (2,))
  for c in range(2):  # M^c = sum_i w_i^c F_i
    for i in range(6):
      ref[..., c] += w[i, c] * fmap[..., i]
  np.testing.assert_allclose(cam.class_activation_maps(fmap, w), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cam.unweighted_maps(fmap)[..., 0], fmap.sum(-1), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="feature_map must be"):
    cam.class_activation_maps(fmap[None], w)


@pytest.fixture(scope="module")
def classifier_3d():
  encoder = unet.get_encoder("resnet_tiny_3d", num_filters=4, small_input=True)
  model = unet.Classifier(num_classes=2, encoder=encoder)
  x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 8, 8, 8, 1)), jnp.float32)
  variables = jax.jit(lambda x: model.init(_key(1), x, train=False))(x)
  # Non-zero BatchNorm statistics and last-norm scales, so CAMs are not trivially zero.
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  return encoder, model, variables, x


def test_3d_cam_mean_plus_bias_is_logit(classifier_3d):
  encoder, model, variables, x = classifier_3d
  logits, maps, (ref_logits, feats) = jax.jit(lambda v, x: (
      *cam.cams_from_variables(encoder, v, x), model.apply(v, x, False, True)))(variables, x)
  fmap = np.asarray(unet.last_feature_map(feats), np.float64)  # c5: (B, 1, 1, 1, K) here
  assert maps.shape == fmap.shape[:4] + (2,)
  head = variables["params"]["head"]
  ref = np.einsum("bdhwk,kc->bdhwc", fmap, np.asarray(head["kernel"], np.float64))
  np.testing.assert_allclose(maps, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ref.mean(axis=(1, 2, 3)) + np.asarray(head["bias"]), ref_logits,
                             rtol=1e-5, atol=1e-5)


def test_3d_cam_mean_plus_bias_on_a_larger_grid():
  """The GAP identity on a 4x4x4 CAM grid (a one-level U-Net encoder keeps the size)."""
  encoder = unet.get_encoder("unet_encoder_3d", widths=(3,), norm="none")
  model = unet.Classifier(num_classes=3, encoder=encoder)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 4, 1)), jnp.float32)
  variables = jax.jit(lambda x: model.init(_key(2), x, train=False))(x)
  logits, maps, direct = jax.jit(lambda v, x: (
      *cam.cams_from_variables(encoder, v, x), model.apply(v, x, False)))(variables, x)
  assert maps.shape == (2, 4, 4, 4, 3)
  bias = variables["params"]["head"]["bias"]
  np.testing.assert_allclose(np.mean(maps, axis=(1, 2, 3)) + bias, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(direct, logits, rtol=1e-5, atol=1e-5)


def test_3d_minmax_is_per_volume_and_channel():
  rng = np.random.default_rng(4)
  maps = rng.normal(size=(3, 2, 3, 4, 2)).astype(np.float32)
  maps[1, ..., 0] = 5.0  # a constant volume becomes zeros
  ref = np.zeros_like(maps)
  for b in range(3):
    for c in range(2):
      m = maps[b, ..., c]
      if m.max() > m.min():
        ref[b, ..., c] = (m - m.min()) / (m.max() - m.min())
  for got in (cam.minmax_normalize(maps), cam.minmax_normalize(jnp.asarray(maps))):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  assert isinstance(cam.minmax_normalize(maps), np.ndarray)
  np.testing.assert_allclose(heatmaps.minmax(maps[..., 0]), ref[..., 0], rtol=1e-6, atol=1e-6)


def test_3d_heatmap_encoder():
  enc = cam.HeatmapEncoder(widths=(2, 3, 4))
  _, shapes = _abstract(enc, (2, 2, 3, 2, 1))
  assert shapes == {"c1": (2, 2, 3, 2, 4), "pooled": (2, 4)}
  v, _ = _abstract(enc, (2, 2, 3, 2, 1))
  assert _count(v["params"]) == sum(27 * a * b + b for a, b in ((1, 2), (2, 3), (3, 4)))


# ------------------------------------------------------------------------- heatmaps
def test_3d_downsample_mask_and_suppression():
  rng = np.random.default_rng(5)
  mask = (rng.uniform(size=(2, 4, 6, 8)) > 0.5).astype(np.float32)
  got = heatmaps.downsample_mask(mask, (2, 3, 2))
  ref = np.zeros((2, 2, 3, 2))
  for n, i, j, k in np.ndindex(ref.shape):
    ref[n, i, j, k] = mask[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 4 * k:4 * k + 4].mean()
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  with pytest.raises(ValueError, match="not a multiple"):
    heatmaps.downsample_mask(mask, (3, 3, 2))
  with pytest.raises(ValueError, match="spatial axes"):
    heatmaps.downsample_mask(mask, (2, 3))

  volumes = (rng.uniform(size=(2, 4, 6, 8, 1)) * 255).astype(np.uint8)
  maps = rng.normal(size=(2, 2, 3, 2, 2)).astype(np.float32)
  out = heatmaps.make_heatmaps(maps, np.array([0, 1]), volumes)
  fg = heatmaps.downsample_mask((volumes[..., 0] > 15).astype(np.float32), (2, 3, 2))
  np.testing.assert_allclose(out["foreground"], fg)
  np.testing.assert_allclose(out["raw"], cam.minmax_normalize(maps)[..., 1], rtol=1e-6)
  assert not out["heatmap"][0].any()  # negative suppression: the normal volume is zero
  np.testing.assert_allclose(out["heatmap"][1], out["raw"][1] * fg[1], rtol=1e-6)


# ---------------------------------------------------------------- training a 3-D CAM
def test_3d_classifier_forward_and_grad_under_jit(classifier_3d):
  """A CAMContrast stage-1 style step on volumes: CE on the pooled logits plus a loss on
  the min-max-normalized 3-D CAMs (eq. 4's per-image mean over d, h, w)."""
  _, model, variables, x = classifier_3d
  labels = jnp.array([0, 1])

  @jax.jit
  def step(params):
    def loss_fn(p):
      (logits, feats), upd = model.apply({**variables, "params": p}, x, True, True,
                                         mutable=["batch_stats"])
      cams = cam.minmax_normalize(
          cam.class_activation_maps(unet.last_feature_map(feats), p["head"]["kernel"]))
      attn = jnp.mean(1.0 - cams[..., 0] + cams[..., 1], axis=(1, 2, 3))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(ce + 0.01 * attn), upd
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, upd), grads = step(variables["params"])
  assert np.isfinite(float(loss))
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  k = grads["encoder"]["layer4_0"]["conv1"]["kernel"]
  assert k.shape == (3, 3, 3, 16, 32)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["encoder"]["stem_conv"]["kernel"]).sum()) > 0
