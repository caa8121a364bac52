"""Tests for the volume augmentations (medrep_jax.data.augment.volume, "standard3d").

CAMContrast Sec. 4.7 runs its 3-D pretraining with the 2-D pipeline unchanged, so
"standard3d" is the standard augmentation on (D, H, W, C) volumes. Volumes are tiny
(4 x 8 x 8) so that CPU compile time stays low; each program is compiled once.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.data import augment as A
from medrep_jax.data.augment import volume as V

D, S = 4, 8  # Depth and (square) slice side.
OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, degrees=0.0, jitter_p=0.0)


def _volume(seed: int = 0, shape=(D, S, S, 1)) -> np.ndarray:
  """A random volume in [0.1, 0.9] (no symmetry, so any flip or rotation shows)."""
  return (0.1 + 0.8 * np.random.RandomState(seed).rand(*shape)).astype(np.float32)


VOL = _volume()


def _check(out, shape):
  out = np.asarray(out)
  assert out.shape == shape and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0


@functools.lru_cache(maxsize=None)
def _batch_fn(policy, **kwargs):
  return jax.jit(lambda k, x, i: A.augment_batch(policy, k, x, indices=i, **kwargs))


# Jitted ops (eager dispatch compiles every primitive on its own, which is slower).
_crop = jax.jit(V.crop_resize_volume, static_argnums=2)
_box = jax.jit(V.crop_box3d_from_uniform, static_argnums=(1, 2, 3))
_rotate = jax.jit(V.rotate_volume)


# ----------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("axis,np_axis", [(0, 0), (1, 1), (2, 2), ("d", 0), ("h", 1), ("w", 2)])
def test_flip_is_np_flip(axis, np_axis):
  np.testing.assert_array_equal(V.flip_volume(VOL, axis), np.flip(VOL, np_axis))


def test_flip_rejects_bad_axis():
  with pytest.raises(ValueError, match="flip axis"):
    V.flip_volume(VOL, 3)


def _linear_axis(x: np.ndarray, axis: int, start: float, extent: float, n: int) -> np.ndarray:
  """Linear resampling of one axis at voxel centres (edge voxels repeated): output i
  samples start + (i + 1/2) extent / n - 1/2. The reference for upsampling."""
  size = x.shape[axis]
  pos = np.clip(start + (np.arange(n) + 0.5) * extent / n - 0.5, 0, size - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, size - 1)
  frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def test_crop_resize_matches_numpy_trilinear():
  vol = _volume(1).astype(np.float64)
  box, out = (0.5, 1.0, 2.0, 2.0, 3.0, 3.5), (5, 6, 7)  # Upsampling on every axis.
  ref = vol
  for axis in range(3):
    ref = _linear_axis(ref, axis, box[axis], box[3 + axis], out[axis])
  got = _crop(vol.astype(np.float32), jnp.asarray(box, jnp.float32), out)
  _check(got, out + (1,))
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_integer_box_at_its_own_size_is_slicing():
  box = jnp.asarray([1.0, 2.0, 0.0, 3.0, 3.0, 4.0])
  got = _crop(VOL, box, (3, 3, 4))
  np.testing.assert_allclose(got, VOL[1:4, 2:5, 0:4], atol=1e-6)
  # The whole-volume box at the input size is the identity.
  np.testing.assert_allclose(_crop(VOL, V.full_box3d(D, S, S), None), VOL, atol=1e-6)


def test_out_size_forms():
  assert V.out_dhw(None, VOL) == (D, S, S)
  assert V.out_dhw(6, VOL) == (6, 6, 6)
  assert V.out_dhw((5, 7), VOL) == (D, 5, 7)  # A 2-D (h, w) size keeps the depth.
  assert V.out_dhw((2, 5, 7), VOL) == (2, 5, 7)
  with pytest.raises(ValueError, match="out_size"):
    V.out_dhw((1, 2, 3, 4), VOL)


def test_crop_box3d_is_inside_and_keeps_the_volume_fraction():
  u = jax.random.uniform(jax.random.key(0), (64, V.CROP3D_UNIFORMS))
  shape = (6, 12, 16)
  boxes = np.asarray(jax.jit(jax.vmap(lambda v: V.crop_box3d_from_uniform(
      v, *shape, (0.3, 0.9))))(u))
  starts, sizes = boxes[:, :3], boxes[:, 3:]
  assert np.all(starts >= -1e-5) and np.all(starts + sizes <= np.array(shape) + 1e-4)
  frac = np.prod(sizes, 1) / np.prod(shape)
  assert np.all(frac >= 0.3 - 1e-5) and np.all(frac <= 1.0 + 1e-5)
  assert np.mean(frac <= 0.9 + 1e-5) > 0.9  # Only the in-plane fallback exceeds it.
  # With ratio (1, 1) every side keeps the fraction s^(1/3) (16 x 16 slices: no fallback).
  box = _box(u[0], 8, 16, 16, (0.5, 0.5), (1.0, 1.0))
  np.testing.assert_allclose(np.asarray(box[3:]) / [8, 16, 16], 0.5 ** (1 / 3), rtol=1e-5)
  box = _box(u[0], 8, 16, 16, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(box, V.full_box3d(8, 16, 16), atol=1e-5)


def test_rotate_90_is_rot90_per_slice():
  # ops.rotate's sign: positive degrees are counter-clockwise, as np.rot90 on (H, W).
  np.testing.assert_allclose(_rotate(VOL, 90.0), np.rot90(VOL, 1, axes=(1, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(_rotate(VOL, -90.0), np.rot90(VOL, -1, axes=(1, 2)),
                             atol=1e-5)
  np.testing.assert_array_equal(_rotate(VOL, 0.0), VOL)
  rotated = _rotate(VOL, 25.0)
  for d in range(D):  # The same angle on every slice: the 2-D op slice by slice.
    np.testing.assert_array_equal(rotated[d], jax.jit(A.rotate)(VOL[d], 25.0))


def test_contrast_and_jitter_use_the_whole_volume():
  mean = VOL.mean()
  np.testing.assert_allclose(V.contrast_volume(VOL, 0.5), mean + 0.5 * (VOL - mean), atol=1e-6)
  np.testing.assert_allclose(V.contrast_volume(VOL, 0.0), np.full_like(VOL, mean), atol=1e-6)
  # u = (0.75, 0.25): brightness factor 0.6 + 0.8 * 0.75 = 1.2, contrast 0.6 + 0.8 * 0.25 = 0.8.
  u = jnp.asarray([0.75, 0.25, 0.5, 0.5])
  bright = np.clip(VOL * 1.2, 0, 1)
  ref = np.clip(bright.mean() + 0.8 * (bright - bright.mean()), 0, 1)
  np.testing.assert_allclose(V.color_jitter_volume_from_uniform(VOL, u, 0.4, 0.4), ref,
                             atol=1e-6)


def test_volume_ops_reject_images():
  with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
    V.rotate_volume(VOL[0], 10.0)
  with pytest.raises(ValueError, match="standard3d"):
    A.standard3d_augment(jax.random.key(0), VOL[0])


# ----------------------------------------------------------------------------- policies


def test_standard3d_identity_settings_return_the_input():
  vols = np.stack([VOL, _volume(2)])
  out = _batch_fn("standard3d", **OFF)(jax.random.key(0), vols, jnp.arange(2))
  _check(out, vols.shape)
  np.testing.assert_allclose(out, vols, atol=1e-5)


def test_standard3d_flip_axes_with_p1_are_np_flips():
  f = _batch_fn("standard3d", **{**OFF, "flip_p": 1.0}, flip_axes=(0, "w"))
  out = f(jax.random.key(0), VOL[None], jnp.arange(1))
  np.testing.assert_allclose(out[0], np.flip(VOL, (0, 2)), atol=1e-5)


def test_standard3d_range_shape_and_per_example_keys():
  vols = np.stack([_volume(s) for s in range(4)])
  idx = np.array([10, 11, 12, 13])
  f = _batch_fn("standard3d", out_size=(3, 6, 6))
  key = jax.random.key(3)
  out = np.asarray(f(key, vols, idx))
  _check(out, (4, 3, 6, 6, 1))
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(f(key, vols[perm], idx[perm]), out[perm], atol=1e-6)
  # Same volume, different example ids: different augmentations.
  same = np.asarray(f(key, np.stack([VOL] * 4), idx))
  assert all(np.abs(same[i] - same[0]).max() > 1e-3 for i in range(1, 4))
  assert np.abs(np.asarray(f(jax.random.key(4), vols, idx)) - out).max() > 1e-3


def test_standard3d_views():
  f = jax.jit(lambda k, x: A.make_views(k, x, "standard3d", num_views=2))
  views = f(jax.random.key(0), VOL[None])
  _check(views, (2, 1) + VOL.shape)
  assert np.abs(np.asarray(views[0] - views[1])).max() > 1e-3


def test_none_is_the_identity_on_images_and_volumes():
  assert A.get_policy("none") is A.no_augment and A.get_policy("standard3d") is A.standard3d_augment
  images, vols = VOL[:, :, :, :], VOL[None]  # (B, H, W, C) and (B, D, H, W, C).
  for x in (images, vols):
    np.testing.assert_array_equal(A.augment_batch("none", jax.random.key(0), x, out_size=3), x)
    np.testing.assert_array_equal(A.make_views(jax.random.key(0), x, "none", 2)[1], x)
  as_uint8 = (VOL * 255).astype(np.uint8)[None]
  np.testing.assert_allclose(A.augment_batch("none", jax.random.key(0), as_uint8),
                             as_uint8 / 255.0, atol=1e-7)


@pytest.mark.parametrize("policy", ["standard", "simclr", "strong"])
def test_2d_policy_given_volumes_fails_clearly(policy):
  match = rf"'{policy}' takes a batch of images \(B, H, W, C\), got shape \(1, 4, 8, 8, 1\)"
  with pytest.raises(ValueError, match=match):
    A.augment_batch(policy, jax.random.key(0), VOL[None])
  with pytest.raises(ValueError, match=match):
    A.make_views(jax.random.key(0), VOL[None], policy)


def test_standard3d_given_images_fails_clearly():
  match = r"'standard3d' takes a batch of volumes \(B, D, H, W, C\), got shape \(4, 8, 8, 1\)"
  with pytest.raises(ValueError, match=match):
    A.augment_batch("standard3d", jax.random.key(0), VOL)
  with pytest.raises(ValueError, match=match):
    A.make_views(jax.random.key(0), VOL, "standard3d")
  with pytest.raises(ValueError, match=r"\(B, H, W, C\) or volumes \(B, D, H, W, C\)"):
    A.augment_batch("none", jax.random.key(0), VOL[0])  # Neither kind.
