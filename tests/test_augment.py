"""Tests for on-device augmentations (medrep_jax.data.augment).

CPU compile time dominates, so images are 16x16, each op group is jitted once,
and each policy is compiled once per input shape/sharding (module fixtures).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from medrep_jax.data import augment as A

S = 16  # Image side.


def _smooth_image(channels: int, seed: int = 0) -> np.ndarray:
  """A smooth (S, S, C) image in [0.1, 0.9] with a blob and per-channel gradients."""
  rs = np.random.RandomState(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, S), np.linspace(-1, 1, S), indexing="ij")
  chans = []
  for _ in range(channels):
    a, b, c = rs.uniform(-1, 1, 3)
    blob = np.exp(-((yy - c * 0.5) ** 2 + (xx - a * 0.5) ** 2) / 0.2)
    chans.append(0.5 + 0.2 * (a * yy + b * xx) / 2 + 0.2 * blob)
  img = np.stack(chans, -1)
  img = 0.1 + 0.8 * (img - img.min()) / (img.max() - img.min())
  return img.astype(np.float32)


RGB, GREY = _smooth_image(3), _smooth_image(1, seed=1)


def _check_image(out, shape):
  out = np.asarray(out)
  assert out.shape == shape
  assert out.dtype == np.float32
  assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0


# ----------------------------------------------------------------------------- single ops


def _all_ops(img, rng, deg):
  """Every op once (PNP is tested on its own); `rng` drives the random ones."""
  k1, k2 = jax.random.split(rng)
  return {
      "rotate": A.rotate(img, deg), "rotate_edge": A.rotate(img, deg, fill="edge"),
      "crop": A.random_resized_crop(img, k1), "hflip": A.hflip(img),
      "jitter": A.color_jitter(img, k2), "autocontrast": A.autocontrast(img),
      "equalize": A.equalize(img), "sharpness": A.sharpness(img, 1.8),
      "brightness": A.brightness(img, 1.3), "grey": A.to_grayscale(img),
      "blur": A.gaussian_blur(img, 1.5), "solarize": A.solarize(img, 0.5),
      # Neutral magnitudes.
      "rotate0": A.rotate(img, 0.0), "brightness1": A.brightness(img, 1.0),
      "sharpness1": A.sharpness(img, 1.0),
      "crop1": A.random_resized_crop(img, k1, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
      "jitter0": A.color_jitter(img, k2, 0.0, 0.0, 0.0, 0.0), "blur0": A.gaussian_blur(img, 1e-3),
      "rotate360": A.rotate(img, 360.0), "rot90": A.rotate(img, 90.0),
      "hflip2": A.hflip(A.hflip(img)),
      "sat_hue": A.saturation(A.hue(img, 0.3), 0.2),
  }


_all_ops_jit = jax.jit(_all_ops)
RANDOM_OPS = ("crop", "jitter")


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "grey"])
def op_outputs(request):
  img = RGB if request.param == 3 else GREY
  run = lambda seed: {k: np.asarray(v) for k, v in
                      _all_ops_jit(img, jax.random.key(seed), 25.0).items()}
  return img, run(0), run(0), run(1)


def test_ops_shape_dtype_range(op_outputs):
  img, out, _, _ = op_outputs
  for name, value in out.items():
    _check_image(value, img.shape)  # Grey stays (S, S, 1): no op adds channels.


def test_ops_deterministic_given_key(op_outputs):
  _, out, again, other = op_outputs
  for name in out:
    np.testing.assert_array_equal(out[name], again[name], err_msg=name)
  for name in RANDOM_OPS:
    assert np.abs(out[name] - other[name]).max() > 1e-3, name


def test_ops_identity_at_neutral_magnitude(op_outputs):
  img, out, _, _ = op_outputs
  for name in ("rotate0", "brightness1", "sharpness1", "crop1", "jitter0", "blur0", "rotate360",
               "hflip2"):
    np.testing.assert_allclose(out[name], img, atol=1e-5, err_msg=name)
  for name in ("rotate", "crop", "hflip", "sharpness", "brightness", "blur", "solarize",
               "equalize", "autocontrast"):
    assert np.abs(out[name] - img).max() > 1e-2, f"{name} did nothing"


def test_ops_known_answers(op_outputs):
  img, out, _, _ = op_outputs
  np.testing.assert_allclose(out["rot90"], np.rot90(img), atol=1e-5)  # Counter-clockwise.
  np.testing.assert_array_equal(out["hflip"], img[:, ::-1])
  np.testing.assert_allclose(out["brightness"], np.clip(img * 1.3, 0, 1), atol=1e-6)
  np.testing.assert_allclose(out["solarize"], np.where(img >= 0.5, 1 - img, img), atol=1e-7)
  # Zero fill darkens the corners of a rotated bright image; edge fill does not.
  assert out["rotate"][0, 0].max() < img.min() and out["rotate_edge"][0, 0].min() > 0.05
  # Blur keeps the mean (up to border renormalization) and lowers the variance.
  assert abs(out["blur"].mean() - img.mean()) < 0.02 and out["blur"].std() < img.std()
  # Sharpening raises the high-frequency content.
  lap = lambda x: np.abs(np.diff(x, 2, axis=0)).mean()
  assert lap(out["sharpness"]) > lap(img)
  grey = out["grey"]
  if img.shape[-1] == 3:
    np.testing.assert_allclose(grey[..., 0], img @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  else:
    np.testing.assert_array_equal(grey, img)
    # Saturation and hue are no-ops on grey; jitter only changes brightness/contrast.
    np.testing.assert_array_equal(out["sat_hue"], img)


def _equalize_reference(x: np.ndarray) -> np.ndarray:
  """NumPy histogram equalization: level v -> (cdf(v) - cdf_min) / (N - cdf_min)."""
  levels = np.clip(np.round(x * 255), 0, 255).astype(int)
  cdf = np.cumsum(np.bincount(levels.ravel(), minlength=256))
  cdf_min = cdf[levels.min()]
  return (cdf[levels] - cdf_min) / (levels.size - cdf_min)


def test_autocontrast_and_equalize_known_answers():
  lo, hi = 0.2, 0.7
  ramp = (np.arange(S * S, dtype=np.float32) / 255).reshape(S, S, 1)  # Every level once.
  fns = jax.jit(lambda x: (A.autocontrast(x), A.equalize(x), A.equalize(jnp.full_like(x, 0.3))))
  ac, eq_ramp, const = fns(lo + (hi - lo) * ramp)
  np.testing.assert_allclose(ac, ramp, atol=1e-5)  # [a, b] -> [0, 1] linearly.
  np.testing.assert_array_equal(const, np.float32(0.3))  # A constant image is left alone.
  _, eq_ramp, _ = fns(ramp)
  np.testing.assert_allclose(eq_ramp, ramp, atol=1e-6)  # Already uniform: unchanged.
  # A skewed image: matches the NumPy reference and flattens the histogram.
  skewed = np.random.RandomState(0).beta(0.7, 4.0, (S, S, 1)).astype(np.float32)
  _, eq, _ = fns(skewed)
  eq = np.asarray(eq)
  np.testing.assert_allclose(eq, _equalize_reference(skewed), atol=1e-6)
  assert eq.min() == 0.0 and eq.max() > 1 - 1e-6
  counts_in = np.histogram(skewed, bins=4, range=(0, 1))[0]
  counts = np.histogram(eq, bins=4, range=(0, 1))[0]
  assert counts_in.max() > 150 and counts.max() - counts.min() < 20, (counts_in, counts)
  assert np.all(np.diff(eq.ravel()[np.argsort(skewed.ravel())]) >= 0)  # Monotone.


def test_saturation_and_hue_on_rgb():
  img = jnp.asarray(RGB)
  f = jax.jit(lambda x: (A.saturation(x, 0.0), A.hue(x, 0.0), A.hue(x, 1.0), A.hue(x, 0.5),
                         A.saturation(x, 1.0)))
  grey, h0, h1, h_half, s1 = f(img)
  np.testing.assert_allclose(grey, A.to_grayscale(img), atol=1e-6)
  np.testing.assert_allclose(h0, img, atol=1e-5)
  np.testing.assert_allclose(h1, img, atol=1e-5)  # A full turn.
  np.testing.assert_allclose(s1, img, atol=1e-6)
  assert np.abs(np.asarray(h_half) - RGB).max() > 0.05
  # A hue shift keeps max and min over channels (HSV value and chroma).
  np.testing.assert_allclose(np.max(h_half, -1), RGB.max(-1), atol=1e-5)
  np.testing.assert_allclose(np.min(h_half, -1), RGB.min(-1), atol=1e-5)


def test_crop_box_is_inside_and_follows_scale():
  u = jax.random.uniform(jax.random.key(0), (512, A.CROP_UNIFORMS))
  box_fn = jax.jit(jax.vmap(A.crop_box_from_uniform, in_axes=(0, None, None, None, None)),
                   static_argnums=(1, 2))
  boxes = np.asarray(box_fn(u, 20, 30, (0.2, 0.6), (0.5, 2.0)))
  top, left, h, w = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 20 + 1e-4) and np.all(left + w <= 30 + 1e-4)
  area = h * w / 600
  assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4
  assert np.all((w / h >= 0.5 - 1e-4) & (w / h <= 2.0 + 1e-4))
  # Out-of-range requests fall back to the centred crop with a clamped aspect ratio.
  fb = np.asarray(box_fn(u[:2], 20, 30, (1.0, 1.0), (0.5, 1.0)))
  np.testing.assert_allclose(fb, [[0.0, 5.0, 20.0, 20.0]] * 2, atol=1e-4)


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_poisson_noise_statistics(exact):
  """PNP: E[x'] = x and Var[x'] = x / lam (Ye et al. 2025, Sec. III-C-1)."""
  levels = np.array([0.02, 0.4, 0.8], np.float32)  # Rates 4 (exact inversion), 80, 160.
  img = np.broadcast_to(levels, (S, S, 3)).copy()
  lam = 200.0
  f = jax.jit(jax.vmap(lambda k, x, lam: A.poisson_noise(x, k, lam, exact),
                       in_axes=(0, None, None)))
  keys = jax.random.split(jax.random.key(0), 32)
  out = np.asarray(f(keys, img, lam))
  _check_image(out[0], img.shape)
  samples = out.reshape(-1, 3)  # 8192 samples per level.
  np.testing.assert_allclose(samples.mean(0), levels, atol=3e-3)
  np.testing.assert_allclose(samples.var(0), levels / lam, rtol=0.1)
  # Outputs are counts / lam; the same key repeats, a different key does not.
  np.testing.assert_allclose(samples * lam, np.round(samples * lam), atol=1e-3)
  np.testing.assert_array_equal(out, f(keys, img, lam))
  assert not np.array_equal(out[0], out[1])
  # A traced photon scale: more photons, less noise.
  less = np.asarray(f(keys, img, 5000.0)).reshape(-1, 3)
  assert np.all(less.var(0) < samples.var(0) / 10)


def test_poisson_sampler_matches_poisson_pmf():
  """The fixed-cost PNP sampler against scipy's Poisson pmf on both sides of the switch at 10.

  It is an inverse-CDF map of one uniform, so a fine grid of u gives its exact
  output distribution (up to 1/N): exact below rate 10, total variation < 0.003 above.
  """
  rates = np.array([0.05, 1.5, 6.0, 9.9, 10.0, 25.0, 300.0], np.float32)
  n = 200_000
  u = (np.arange(n, dtype=np.float64)[:, None] + 0.5) / n
  counts = np.asarray(jax.jit(A.poisson_from_uniform)(u.astype(np.float32), rates[None]))
  assert np.all(counts == np.round(counts)) and counts.min() >= 0
  for j, rate in enumerate(rates):
    hist = np.bincount(counts[:, j].astype(int), minlength=int(3 * rate) + 50) / n
    tv = 0.5 * np.abs(hist - stats.poisson.pmf(np.arange(hist.size), rate)).sum()
    assert tv < (1e-4 if rate < 10 else 3e-3), (rate, tv)
    # Moments of PNP: mean and variance both equal the rate.
    mean = np.sum(np.arange(hist.size) * hist)
    var = np.sum((np.arange(hist.size) - mean) ** 2 * hist)
    np.testing.assert_allclose([mean, var], [rate, rate], rtol=0.01, atol=1e-3)


# ----------------------------------------------------------------------------- policies


def test_random_subset_mask_is_uniform():
  u = jax.random.uniform(jax.random.key(0), (4000, 8))
  mask = np.asarray(jax.vmap(lambda v: A.random_subset_mask(v, 2))(u))
  assert np.all(mask.sum(1) == 2)
  np.testing.assert_allclose(mask.mean(0), 2 / 8, atol=0.03)


def test_strong_augment_validates_arguments():
  with pytest.raises(ValueError, match="unknown ops"):
    A.strong_augment(jax.random.key(0), RGB, op_names=("rotate", "warp"))
  with pytest.raises(ValueError, match="num_ops"):
    A.strong_augment(jax.random.key(0), RGB, num_ops=3, op_names=("rotate", "pnp"))
  with pytest.raises(ValueError, match="unknown augmentation policy"):
    A.make_views(jax.random.key(0), RGB[None], "weak")
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    A.augment_batch("simclr", jax.random.key(0), RGB)


def test_strong_augment_without_ops_is_a_resize():
  f = jax.jit(lambda x: A.augment_batch("strong", jax.random.key(0), x, num_ops=0, op_names=()))
  np.testing.assert_allclose(f(RGB[None]), RGB[None], atol=1e-5)
  u8 = np.round(RGB * 255).astype(np.uint8)[None]
  np.testing.assert_allclose(f(u8), u8 / 255.0, atol=1e-5)  # uint8 input is scaled.


def _strong_views(images, **kwargs):
  f = jax.jit(lambda k, x: A.make_views(k, x, "strong", 2, **kwargs))
  return np.asarray(f(jax.random.key(3), images))


def test_strong_crop_mode_always_crops_every_view():
  """Sec. III-C-1: every view is a random resized crop (crop_mode="always"); with
  crop_mode="drawn" the crop is one of the num_ops drawn ops, so num_ops=0 crops none."""
  images = np.broadcast_to(RGB, (8,) + RGB.shape).copy()
  only_crop = dict(op_names=("crop",), num_ops=0, crop_scale=(0.2, 0.6))
  always = _strong_views(images, crop_mode="always", **only_crop)
  assert always.shape == (2,) + images.shape
  diff = np.abs(always - images[None]).reshape(16, -1).max(-1)
  assert diff.min() > 1e-2, diff  # All 16 views are cropped, none is the plain resize.
  drawn = _strong_views(images, crop_mode="drawn", **only_crop)
  np.testing.assert_allclose(drawn, np.broadcast_to(images, drawn.shape), atol=1e-5)
  # "always" draws num_ops from the other ops: crop + 1 of 1 is allowed, crop + 2 is not.
  both = _strong_views(images, op_names=("crop", "brightness"), num_ops=1,
                       crop_mode="always", crop_scale=(0.2, 0.6))
  assert np.abs(both - always).reshape(16, -1).max(-1).min() > 1e-3  # Brightness on top.
  with pytest.raises(ValueError, match=r"num_ops=2 must be an int in \[0, 1\]"):
    A.strong_augment(jax.random.key(0), RGB, op_names=("crop", "brightness"), num_ops=2)
  with pytest.raises(ValueError, match="crop_mode"):
    A.strong_augment(jax.random.key(0), RGB, crop_mode="sometimes")


def _dcl_config():
  from conftest import config_module
  return config_module("dcl_cstp").dcl_cstp_config(size="tiny", data="phantoms")


def test_strong_config_defaults_are_the_code_defaults():
  """`augment.strong` holds every field with `strong_augment`'s own default, so code
  that calls the policy without the config's kwargs makes the same views."""
  import inspect
  kwargs = A.policy_kwargs(_dcl_config().augment)
  params = inspect.signature(A.strong_augment).parameters
  assert set(kwargs) == set(A.STRONG_CONFIG_FIELDS.values())
  assert kwargs == {k: params[k].default for k in kwargs}
  assert kwargs["crop_mode"] == "always" and kwargs["op_names"] == A.STRONG_OPS
  baseline = _dcl_config()
  baseline.augment.policy = "simclr"  # The baselines' policy takes no strong fields.
  assert A.policy_kwargs(baseline.augment) == {}


def test_strong_config_fields_change_the_ops_applied():
  images = np.stack([RGB, RGB[::-1], GREY.repeat(3, -1), RGB * 0.5])
  c = _dcl_config()
  c.augment.strong.ops = ["brightness"]  # A list, as a config override may give.
  c.augment.strong.num_ops = 1
  kwargs = A.policy_kwargs(c.augment)
  assert kwargs["op_names"] == ("brightness",) and kwargs["num_ops"] == 1
  views = _strong_views(images, **kwargs)
  np.testing.assert_array_equal(
      views, _strong_views(images, op_names=("brightness",), num_ops=1))
  # Each view is the input times one factor in 1 +- 0.9 (then clipped to [0, 1]).
  for view in views:
    for out, img in zip(view, images):
      ok = out < 1.0 - 1e-6
      factor = out[ok] / img[ok]
      np.testing.assert_allclose(factor, np.median(factor), rtol=1e-4)
      assert 0.1 - 1e-4 <= np.median(factor) <= 1.9 + 1e-4
  assert np.abs(views - images[None]).max() > 1e-2
  # No drawn ops and the crop drawn (none drawn): the plain resize.
  c.augment.strong.update(dict(ops=("crop", "rotate"), num_ops=0, crop_mode="drawn"))
  plain = _strong_views(images, **A.policy_kwargs(c.augment))
  np.testing.assert_allclose(plain, np.broadcast_to(images, plain.shape), atol=1e-5)


@pytest.mark.parametrize("field, value, match", [
    ("ops", ("rotate", "warp"), r"augment\.strong\.ops has unknown ops \['warp'\]"),
    ("num_ops", 8, r"augment\.strong\.num_ops=8 must be an int in \[0, 7\]"),
    ("num_ops", -1, r"augment\.strong\.num_ops=-1"),
    ("crop_mode", "often", r"augment\.strong\.crop_mode='often'"),
    ("magnitude", (0.0, 2.0), r"augment\.strong\.magnitude"),
], ids=["unknown_op", "num_ops_high", "num_ops_negative", "crop_mode", "magnitude"])
def test_bad_strong_config_fails_naming_the_key(field, value, match):
  from medrep_jax.config_lib import ConfigError
  from medrep_jax.methods import load_method
  c = _dcl_config()
  c.augment.strong[field] = value
  with pytest.raises(ConfigError, match=match):
    A.policy_kwargs(c.augment)
  with pytest.raises(ConfigError, match=match):  # When the method is built, not mid-step.
    load_method(c)


B = 8
POLICY_NAMES = ("strong", "simclr", "standard")


@functools.lru_cache(maxsize=None)
def _views_fn(policy):
  return jax.jit(functools.partial(A.make_views, policy=policy, num_views=2))


@pytest.fixture(scope="module", params=POLICY_NAMES)
def policy_views(request):
  """One batch of identical images (so any difference comes from the keys)."""
  images = np.broadcast_to(RGB, (B,) + RGB.shape).copy()
  f = _views_fn(request.param)
  key = jax.random.key(42)
  return request.param, images, f, np.asarray(f(key, images))


def test_policy_shape_range_determinism(policy_views):
  _, images, f, views = policy_views
  _check_image(views, (2,) + images.shape)
  np.testing.assert_array_equal(views, f(jax.random.key(42), images))
  assert np.abs(views - np.asarray(f(jax.random.key(7), images))).max() > 1e-2


def test_policy_examples_and_views_differ(policy_views):
  _, _, _, views = policy_views
  for v in range(2):
    for i in range(1, B):  # Identical inputs, different per-example keys.
      assert np.abs(views[v, i] - views[v, 0]).max() > 1e-3, (v, i)
  for i in range(B):
    assert np.abs(views[0, i] - views[1, i]).max() > 1e-3, i


def test_policy_independent_of_batch_size(policy_views):
  _, images, f, views = policy_views
  np.testing.assert_allclose(f(jax.random.key(42), images[:2]), views[:, :2], atol=1e-6)


def test_policy_sharded_matches_single_device(policy_views):
  policy, images, f, views = policy_views
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ("data",))
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  out = f(jax.random.key(42), sharded)
  np.testing.assert_allclose(out, views, atol=1e-6, err_msg=policy)
  assert not out.sharding.is_fully_replicated  # The views stay sharded over the batch.


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_policy_grey_and_out_size(policy):
  f = jax.jit(lambda k, x: A.augment_batch(policy, k, x, out_size=(12, 8)))
  images = np.stack([GREY, GREY[::-1]])
  out = np.asarray(f(jax.random.key(0), images))
  _check_image(out, (2, 12, 8, 1))
  assert np.abs(out[0] - out[1]).max() > 1e-3


# ------------------------------------------- CAMContrast Table 2: downstream augmentation
def _spot_pair(n: int = 6):
  """n images (S x S, grey) with one bright 3x3 spot right of the centre, and the spot as
  a mask (class 1) beside a class-2 stripe along the top row."""
  img = np.zeros((S, S, 1), np.float32)
  img[7:10, 11:14] = 1.0
  mask = np.zeros((S, S), np.int32)
  mask[7:10, 11:14] = 1
  mask[0, :] = 2
  return np.repeat(img[None], n, 0), np.repeat(mask[None], n, 0)


def _centroid(x: np.ndarray) -> np.ndarray:
  yy, xx = np.mgrid[:S, :S]
  w = x / x.sum()
  return np.array([(w * yy).sum(), (w * xx).sum()]) - (S - 1) / 2


@functools.lru_cache(maxsize=None)
def _downstream_fn(**kwargs):
  return jax.jit(lambda k, x, m: A.augment_labelled_batch(
      k, x, {"mask": m}, label_classes={"mask": 3}, **kwargs))


def test_downstream_defaults_are_the_identity():
  assert A.downstream_kwargs(A.DOWNSTREAM_OFF) is None
  assert A.downstream_kwargs(None) is None
  img, mask = _spot_pair(2)
  out, moved = A.augment_labelled_batch(jax.random.key(0), img, {"mask": mask},
                                        label_classes={"mask": 3})
  np.testing.assert_array_equal(out, img)
  np.testing.assert_array_equal(moved["mask"], mask)


def test_downstream_flip_and_rotation_move_image_and_mask_alike():
  img, mask = _spot_pair()
  # flip_p=1, no rotation: the exact mirror of image and mask.
  flip = A.downstream_kwargs(dict(flip_p=1.0))
  out, moved = _downstream_fn(**flip)(jax.random.key(0), img, mask)
  np.testing.assert_array_equal(out, img[:, :, ::-1])
  np.testing.assert_array_equal(moved["mask"], mask[:, :, ::-1])
  assert moved["mask"].dtype == mask.dtype
  # rotate_degrees=90: the spot (at angle 0 from the centre) turns by U(-90, 90) degrees.
  rot = A.downstream_kwargs(dict(rotate_degrees=90.0))
  keys = jax.random.key(1)
  out, moved = _downstream_fn(**rot)(keys, img, mask)
  out, moved = np.asarray(out[..., 0]), np.asarray(moved["mask"])
  angles = []
  for o, m in zip(out, moved):
    c_img, c_mask = _centroid(o), _centroid((m == 1).astype(np.float32))
    np.testing.assert_allclose(c_img, c_mask, atol=0.75)  # the mask follows the image
    assert np.linalg.norm(c_img) == pytest.approx(np.linalg.norm(_centroid(img[0, ..., 0])),
                                                  abs=0.3)
    angles.append(np.degrees(np.arctan2(-c_img[0], c_img[1])))  # counter-clockwise
    assert set(np.unique(m)) <= {0, 1, 2}  # labels never blend
  angles = np.asarray(angles)
  assert np.all(np.abs(angles) <= 90.5) and np.abs(angles).max() > 30  # beyond +-30
  assert (angles > 1).any() and (angles < -1).any()


def test_downstream_crop_scale_zooms_in():
  yy = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
  img = np.broadcast_to(yy, (4, S, S, 1)).copy()  # a vertical ramp
  mask = np.zeros((4, S, S), np.int32)
  crop = A.downstream_kwargs(dict(crop_scale=(0.25, 0.25)))
  out, _ = _downstream_fn(**crop)(jax.random.key(2), img, mask)
  spans = np.ptp(np.asarray(out)[..., 0], axis=1).mean(axis=1)
  # A quarter of the area at aspect 1: half the side, so half the ramp, resized back.
  np.testing.assert_allclose(spans, 0.5 * np.ptp(yy), atol=0.08)
  full, _ = _downstream_fn(**A.downstream_kwargs(dict(crop_scale=(1.0, 1.0), flip_p=1e-9)))(
      jax.random.key(2), img, mask)
  np.testing.assert_allclose(np.ptp(np.asarray(full)[..., 0], axis=1).mean(), 1.0, atol=1e-5)


@pytest.mark.parametrize("field, value, match", [
    ("crop_scale", (0.9, 0.5), r"augment\.crop_scale=\(0\.9, 0\.5\)"),
    ("crop_scale", (0.0, 1.0), r"augment\.crop_scale"),
    ("crop_ratio", "wide", r"augment\.crop_ratio='wide'"),
    ("flip_p", 1.5, r"augment\.flip_p=1\.5 must be a probability"),
    ("rotate_degrees", -30.0, r"augment\.rotate_degrees=-30\.0"),
    ("fill", "reflect", r"augment\.fill='reflect'"),
    ("shear", 10.0, r"augment\.shear: not a field"),
])
def test_bad_downstream_config_fails_naming_the_key(field, value, match):
  from medrep_jax.config_lib import ConfigError
  with pytest.raises(ConfigError, match=match):
    A.downstream_kwargs({**A.DOWNSTREAM_OFF, field: value})
