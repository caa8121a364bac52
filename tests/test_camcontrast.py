"""CAMContrast: eq. 1 CAMs, eq. 4 L_attn, heatmap suppression, fixed crops, eq. 5 NT-Xent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.losses import cam as cam_losses
from medrep_jax.methods.camcontrast_parts import crops, heatmaps
from medrep_jax.models import cam, unet


# ------------------------------------------------------------------------------ eq. 1
@pytest.fixture(scope="module")
def tiny_classifier():
  encoder = unet.UNetEncoder(widths=(4, 6), norm="batch")
  model = unet.Classifier(num_classes=2, encoder=encoder)
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
  # Non-trivial BatchNorm statistics, so a CAM that ignored them would differ.
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  return encoder, model, variables, x


def test_cam_matches_numpy_reference(tiny_classifier):
  encoder, model, variables, x = tiny_classifier
  logits, maps = cam.cams_from_variables(encoder, variables, x)
  ref_logits, feats = model.apply(variables, x, False, True)
  fmap = np.asarray(feats["c2"], np.float64)  # (B, h, w, K), last map before the GAP
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)  # (K, C)
  ref = np.zeros(fmap.shape[:3] + (2,))
  for c in range(2):  # M^c = sum_i w_i^c F_i
    for i in range(fmap.shape[-1]):
      ref[..., c] += w[i, c] * fmap[..., i]
  np.testing.assert_allclose(maps, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  # GAP commutes with eq. 1: the CAM's spatial mean plus the bias is the logit.
  bias = np.asarray(variables["params"]["head"]["bias"])
  np.testing.assert_allclose(ref.mean(axis=(1, 2)) + bias, ref_logits, rtol=1e-5, atol=1e-6)
  _, flat = cam.cams_from_variables(encoder, variables, x, weighted=False)
  np.testing.assert_allclose(flat[..., 0], fmap.sum(-1), rtol=1e-5, atol=1e-5)


def test_cam_rejects_bad_input(tiny_classifier):
  encoder, _, variables, x = tiny_classifier
  with pytest.raises(ValueError, match="kernel must be"):
    cam.class_activation_maps(jnp.zeros((1, 2, 2, 6)), jnp.zeros((5, 2)))
  with pytest.raises(ValueError, match="params\\['head'\\]"):
    cam.cams_from_variables(encoder, {"params": {"encoder": {}}}, x)
  with pytest.raises(ValueError, match="feature_map must be"):
    cam.unweighted_maps(jnp.zeros((2, 2, 6)))


# ------------------------------------------------------------------------------ eq. 4
def test_attention_loss_and_indicator():
  rng = np.random.default_rng(0)
  cams = rng.uniform(size=(5, 3, 4, 2)).astype(np.float32)
  # (p0, y): normal predicted normal (on), the 0.5 boundary (on), normal predicted
  # abnormal (off), abnormal predicted normal (off), abnormal predicted abnormal (off).
  p0 = np.array([0.9, 0.5, 0.3, 0.8, 0.1], np.float32)
  labels = np.array([0, 0, 0, 1, 1], np.int32)
  probs = np.stack([p0, 1 - p0], -1)
  got = cam_losses.attention_loss(jnp.asarray(cams), jnp.asarray(probs), jnp.asarray(labels))
  on = np.array([1, 1, 0, 0, 0], np.float32)
  ref = on * (1 - cams[..., 0] + cams[..., 1]).sum(axis=(1, 2)) / (3 * 4)  # 1/|M0| sum_ij
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_array_equal(cam_losses.attention_indicator(jnp.asarray(probs),
                                                               jnp.asarray(labels)), on)
  # The indicator is not differentiated: no gradient reaches the probabilities, and none
  # reaches the CAMs of examples it switches off.
  g_probs = jax.grad(lambda p: cam_losses.attention_loss(cams, p, labels).sum())(probs)
  np.testing.assert_array_equal(g_probs, 0.0)
  g_cams = jax.grad(lambda m: cam_losses.attention_loss(m, probs, labels).sum())(cams)
  assert np.all(g_cams[on == 0] == 0) and np.all(g_cams[on == 1] != 0)


def test_attention_loss_multilabel_and_errors():
  cams = jnp.full((3, 2, 2, 4), 0.25)
  probs = jnp.array([[0.1] * 4, [0.1, 0.6, 0.1, 0.1], [0.1] * 4])
  labels = jnp.array([[0] * 4, [0] * 4, [0, 1, 0, 0]])
  np.testing.assert_allclose(cam_losses.attention_loss_multilabel(cams, probs, labels),
                             [0.25, 0.0, 0.0])
  with pytest.raises(ValueError, match="C = 2"):
    cam_losses.attention_loss(cams, probs, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="labels must have shape"):
    cam_losses.attention_loss(cams[..., :2], probs[:, :2], jnp.zeros(4, jnp.int32))


def test_classifier_loss_is_eq2_on_minmax_cams(tmp_path):
  """The stage-1 loss terms are CE and eq. 4 on the min-max normalized eq. 1 CAMs."""
  from conftest import config_module
  stage_config = config_module("camcontrast").stage_config
  from medrep_jax.methods.camcontrast_parts.classifier_stage import ClassifierStage
  stage = ClassifierStage(stage_config("classifier", data="phantoms", size="tiny"))
  stage.make_source("train")
  rng = np.random.default_rng(1)
  fmap = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
  kernel = rng.normal(size=(5, 2)).astype(np.float32)
  logits = np.array([[2.0, -1.0], [0.0, 1.0], [1.0, 0.5], [-1.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1, 1], np.int32)
  ce, attn = stage.loss(jnp.asarray(logits), jnp.asarray(fmap), jnp.asarray(kernel),
                        jnp.asarray(labels))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(ce, -np.log(p[np.arange(4), labels]), rtol=1e-5)
  m = np.einsum("bhwk,kc->bhwc", fmap, kernel)
  lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
  m = (m - lo) / (hi - lo)
  ref = np.where((p[:, 0] >= 0.5) & (labels == 0),
                 (1 - m[..., 0] + m[..., 1]).mean(axis=(1, 2)), 0.0)
  np.testing.assert_allclose(attn, ref, rtol=1e-5, atol=1e-6)
  assert ref[0] > 0 and np.all(ref[1:] == 0)


# ------------------------------------------------------------------------------ heatmaps
def test_minmax_and_negative_suppression():
  maps = np.zeros((3, 2, 2, 2), np.float32)
  maps[0, ..., 1] = [[1.0, 3.0], [5.0, 2.0]]
  maps[1, ..., 1] = [[-2.0, 0.0], [2.0, 6.0]]
  maps[2, ..., 1] = 7.0  # constant -> 0
  maps[..., 0] = 100.0  # the normal-class CAM is never used for binary heatmaps
  images = np.full((3, 4, 4, 1), 255, np.uint8)
  labels = np.array([1, 0, 1])
  off = heatmaps.HeatmapOptions(negative_suppression=False, background_suppression=False)
  out = heatmaps.make_heatmaps(maps, labels, images, off)
  np.testing.assert_allclose(out["raw"][0], [[0.0, 0.5], [1.0, 0.25]])
  np.testing.assert_allclose(out["raw"][1], [[0.0, 0.25], [0.5, 1.0]])
  np.testing.assert_array_equal(out["raw"][2], 0.0)
  np.testing.assert_array_equal(out["heatmap"], out["raw"])
  neg = heatmaps.make_heatmaps(maps, labels, images,
                               heatmaps.HeatmapOptions(background_suppression=False))
  np.testing.assert_array_equal(neg["heatmap"][1], 0.0)  # normal-labelled: zeroed
  np.testing.assert_array_equal(neg["heatmap"][[0, 2]], out["raw"][[0, 2]])


def test_background_suppression_threshold_and_downsampling():
  images = np.full((1, 8, 8, 3), 200, np.uint8)
  images[0, :, :4] = 15  # exactly the threshold: background (the mask is input > 15)
  images[0, :4, 3, 0] = 16  # one bright channel is enough: foreground
  maps = np.zeros((1, 4, 4, 2), np.float32)
  maps[0, ..., 1] = np.arange(16).reshape(4, 4)
  out = heatmaps.make_heatmaps(maps, np.array([1]), images)
  fg = (images[0].max(-1) > 15).astype(np.float64)
  ref_fg = np.array([[fg[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for j in range(4)]
                     for i in range(4)])  # area downsampling to the 4x4 heatmap grid
  np.testing.assert_allclose(out["foreground"][0], ref_fg)
  assert ref_fg[0, 1] == 0.5 and ref_fg[0, 0] == 0.0 and ref_fg[3, 1] == 0.0
  np.testing.assert_allclose(out["heatmap"][0], out["raw"][0] * ref_fg, rtol=1e-6)
  # float images in [0, 1] give the same mask as uint8
  as_float = heatmaps.foreground_mask(images.astype(np.float32) / 255.0)
  np.testing.assert_array_equal(as_float, heatmaps.foreground_mask(images))
  with pytest.raises(ValueError, match="not a multiple"):
    heatmaps.make_heatmaps(np.zeros((1, 3, 3, 2)), np.array([1]), images)


def test_multilabel_and_unweighted_map_selection():
  maps = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0), np.full((2, 2), 8.0)], -1)[None]
  maps = np.repeat(maps, 2, 0).astype(np.float32)
  labels = np.array([[1, 1, 0], [0, 0, 0]])
  sel = heatmaps.select_maps(maps, labels)
  np.testing.assert_allclose(sel[0], 2.0)  # mean of the positive classes' CAMs
  np.testing.assert_allclose(sel[1], 4.0)  # no positive class: mean of all
  np.testing.assert_allclose(heatmaps.select_maps(maps[..., :1], labels), 1.0)
  with pytest.raises(ValueError, match="do not match"):
    heatmaps.select_maps(maps, np.array([[1, 0], [0, 1]]))


# ------------------------------------------------------------------------------ crops
def _grid_pair(n=2, h=6, s=4, c=1):
  """Images whose block means are the heatmaps: crop k of both must cover one region."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n, h * s, h * s, c)).astype(np.uint8)
  heat = images.astype(np.float64).mean(-1).reshape(n, h, s, h, s).mean(axis=(2, 4))
  return images, heat.astype(np.float32), s


@pytest.mark.parametrize("h", [4, 6])
def test_five_crops_cover_the_right_regions(h):
  images, heat, s = _grid_pair(h=h)
  out = crops.fixed_crops(images, heat, "five")
  half, big = h // 2, h * s
  assert out["image"].shape == (10, big // 2, big // 2, 1)
  assert out["heatmap"].shape == (10, half, half, 1)
  np.testing.assert_array_equal(out["position"], np.tile(np.arange(5), 2))
  np.testing.assert_array_equal(out["source"], np.repeat([0, 1], 5))
  centre = (h - half) // 2  # 1 for h = 4 and for h = 6 (heatmap units)
  corners = {"TL": (0, 0), "TR": (0, half), "BL": (half, 0), "BR": (half, half),
             "C": (centre, centre)}
  for k, name in enumerate(crops.POSITIONS):
    t, l = corners[name]
    for i in range(2):
      got_img, got_heat = out["image"][5 * i + k], out["heatmap"][5 * i + k, ..., 0]
      np.testing.assert_array_equal(got_img, images[i, t * s:(t + half) * s,
                                                    l * s:(l + half) * s])
      np.testing.assert_array_equal(got_heat, heat[i, t:t + half, l:l + half])
      block = got_img[..., 0].astype(np.float64).reshape(half, s, half, s).mean(axis=(1, 3))
      np.testing.assert_allclose(block, got_heat, rtol=1e-6)  # same region in both
  # the four corners tile the image exactly once
  tl, tr, bl, br = (out["image"][k] for k in range(4))
  np.testing.assert_array_equal(np.block([[tl[..., 0], tr[..., 0]], [bl[..., 0], br[..., 0]]]),
                                images[0, ..., 0])


def test_other_crop_strategies_and_errors():
  images, heat, _ = _grid_pair(h=4)
  four = crops.fixed_crops(images, heat, "four")
  np.testing.assert_array_equal(four["position"], np.tile(np.arange(4), 2))
  none = crops.fixed_crops(images, heat, "none")
  assert none["image"].shape == (2, 8, 8, 1) and none["heatmap"].shape == (2, 4, 4, 1)
  assert np.all(none["position"] == crops.WHOLE)
  whole = crops.fixed_crops(images, heat, "random")
  np.testing.assert_array_equal(whole["image"], images)
  with pytest.raises(ValueError, match="must be even"):
    crops.fixed_crops(images[:, :12, :12], heat[:, :3, :3], "five")
  with pytest.raises(ValueError, match="crop strategy"):
    crops.fixed_crops(images, heat, "six")
  with pytest.raises(ValueError, match="integer multiple"):
    crops.fixed_crops(images[:, :15], heat, "five")


def test_random_aligned_crops_keep_image_and_heatmap_together():
  images, heat, s = _grid_pair(n=16, h=6)
  img, hm = crops.random_aligned_crops(jax.random.key(3), jnp.asarray(images, jnp.float32),
                                       jnp.asarray(heat)[..., None], stride=s)
  assert img.shape == (16, 12, 12, 1) and hm.shape == (16, 3, 3, 1)
  block = np.asarray(img[..., 0], np.float64).reshape(16, 3, s, 3, s).mean(axis=(2, 4))
  np.testing.assert_allclose(block, hm[..., 0], rtol=1e-5)
  assert len({np.asarray(x).tobytes() for x in hm}) > 1  # offsets differ between examples


def _coordinate_images(n=6, side=12):
  """Images whose pixel (y, x) holds y * side + x: a crop's first pixel gives its box."""
  grid = np.arange(side * side, dtype=np.float32).reshape(side, side)
  return jnp.asarray(np.broadcast_to(grid[None, ..., None], (n, side, side, 1)).copy())


def _offsets(crop_batch, side=12):
  first = np.asarray(crop_batch[:, 0, 0, 0]).astype(int)
  return np.stack([first // side, first % side], 1)


def _pretrain(variant, **crops_fields):
  from medrep_jax.methods import load_method
  from conftest import config_module
  c = config_module("camcontrast").stage_config("pretrain", variant=variant,
                                                data="phantoms", size="tiny")
  c.crops.update(crops_fields)
  return load_method(c)


def test_simclr_views_come_from_independent_crop_boxes():
  """Sec. 3.2 / 4.4: the conventional SimCLR positive pair is two random crops of one
  image, each with its own box (`crops.views="independent"`, the configs' default)."""
  images = _coordinate_images()
  batch = {"image": images, "index": jnp.arange(6)}
  stage = _pretrain("simclr")
  assert stage.crop_views == "independent" and stage.independent_crops
  x, h = stage._inputs(batch, jax.random.key(0))
  assert x.shape == (2, 6, 6, 6, 1) and h is None
  boxes = [_offsets(x[v]) for v in range(2)]
  for v in range(2):  # every view is an exact window of its image
    for i, (t, l) in enumerate(boxes[v]):
      np.testing.assert_array_equal(x[v, i], images[i, t:t + 6, l:l + 6])
  assert (boxes[0] != boxes[1]).any(axis=1).sum() >= 4  # the two views' boxes differ
  # The views augment each view's own crop, with `make_views`' view keys.
  from medrep_jax.data import augment
  x = x / 144.0
  views = jax.jit(stage._views)(jax.random.key(1), x, batch["index"])
  one = jax.jit(lambda k, xv: augment.augment_batch("standard", k, xv, indices=batch["index"]))
  for v in range(2):
    ref = one(jax.random.fold_in(jax.random.key(1), v), x[v])
    np.testing.assert_allclose(views[v], ref, atol=1e-6)
  # "shared": one crop per image, augmented twice (the behaviour before the switch).
  shared = _pretrain("simclr", views="shared")
  y, _ = shared._inputs(batch, jax.random.key(0))
  assert not shared.independent_crops and y.shape == (6, 6, 6, 1)
  with pytest.raises(ValueError, match="crops.views='both'"):
    _pretrain("simclr", views="both")


def test_camcontrast_random_crops_keep_image_and_heatmap_aligned():
  """crop=random for CAMContrast: one box for the image and its heatmap, whatever
  crops.views says (the heatmap is the image's second view)."""
  images, heat, s = _grid_pair(n=8, h=6)
  stage = _pretrain("camcontrast", views="independent")
  stage.manifest = {"strategy": "random", "stride": s}  # as load_crops gives for crop=random
  assert stage.random_crop and not stage.independent_crops
  batch = {"image": jnp.asarray(images, jnp.float32), "heatmap": jnp.asarray(heat)[..., None]}
  img, hm = stage._inputs(batch, jax.random.key(5))
  assert img.shape == (8, 12, 12, 1) and hm.shape == (8, 3, 3, 1)
  block = np.asarray(img[..., 0], np.float64).reshape(8, 3, s, 3, s).mean(axis=(2, 4))
  np.testing.assert_allclose(block, hm[..., 0], rtol=1e-5)


# ------------------------------------------------------------------------------ eq. 5
def _np_con(z, i, j, tau):
  """L_con(z_i, z_j) of eq. 5 with explicit sums over k != i."""
  num = np.exp(z[i] @ z[j] / tau)
  den = sum(np.exp(z[i] @ z[k] / tau) for k in range(len(z)) if k != i)
  return -np.log(num / den)


def test_image_heatmap_nt_xent_matches_numpy_reference():
  """Algorithm 1: l = 1/2B sum_i [L(z1_i, z2_i) + L(z2_i, z1_i)] on the pair projections."""
  from medrep_jax.losses import contrastive as cl
  from medrep_jax.models import heads
  from medrep_jax.methods.camcontrast_parts.pretrain_stage import PretrainNet
  net = PretrainNet(encoder=unet.UNetEncoder((4, 8)), projector=heads.MLPProjector(8, 6),
                    heatmap_encoder=cam.HeatmapEncoder((4, 4, 4)),
                    heatmap_projector=heads.MLPProjector(8, 6))
  x = jax.random.uniform(jax.random.key(0), (5, 8, 8, 3))
  h = jax.random.uniform(jax.random.key(1), (5, 2, 2, 1))
  variables = jax.jit(net.init)(jax.random.key(2), x, h)
  z1, z2 = jax.jit(lambda v: net.apply(v, x, h, False, method=PretrainNet.pair))(variables)
  assert z1.shape == z2.shape == (5, 6)
  tau = 0.05
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  b = 5
  ref = sum(_np_con(z, i, i + b, tau) + _np_con(z, i + b, i, tau) for i in range(b)) / (2 * b)
  got = jnp.mean(cl.nt_xent(z1, z2, tau))
  assert float(got) == pytest.approx(ref, rel=1e-4)
