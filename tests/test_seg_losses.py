"""Tests for medrep_jax.losses.segmentation against NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.losses import segmentation as _sl


class _Jitted:
  """The module's functions, jitted: one compile per call signature instead of
  one per eager primitive (much faster on CPU)."""

  def __getattr__(self, name):
    fn = getattr(_sl, name)
    static = ("include_background",) if name in ("dice_loss", "iou_loss") else ()
    return jax.jit(fn, static_argnames=static)


sl = _Jitted()


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture
def binary_case():
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 16, 16), np.float32)
  mask[0, 2:10, 3:12] = 1
  mask[1, 5:16, 0:7] = 1
  mask[2, 0:16, 8:16] = 1
  logits = rng.normal(size=(3, 16, 16, 1)).astype(np.float32) * 2
  return logits, mask


def test_dice_and_iou_perfect_and_inverted_binary(binary_case):
  _, mask = binary_case
  perfect = 30.0 * (2 * mask[..., None] - 1)
  for loss in (sl.dice_loss, sl.iou_loss):
    assert float(loss(perfect, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(-perfect, mask)) == pytest.approx(1.0, abs=0.01)
    assert float(loss(-perfect, mask, smooth=1e-6)) == pytest.approx(1.0, abs=1e-5)
  # Empty target and empty prediction: perfect agreement, loss 0.
  empty = np.zeros_like(mask)
  assert float(sl.dice_loss(-30 + 0 * perfect, empty)) == pytest.approx(0.0, abs=1e-5)


def test_dice_and_iou_multiclass_perfect_and_inverted():
  labels = np.zeros((2, 8, 8), np.int32)
  labels[:, :4] = 1
  labels[:, 4:, :4] = 2
  one_hot = np.eye(3, dtype=np.float32)[labels]
  perfect = 40.0 * one_hot
  wrong = 40.0 * np.eye(3, dtype=np.float32)[(labels + 1) % 3]
  for loss in (sl.dice_loss, sl.iou_loss):
    assert float(loss(perfect, labels)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(wrong, labels, smooth=1e-6)) == pytest.approx(1.0, abs=1e-5)


def test_soft_dice_and_iou_match_numpy(binary_case):
  logits, mask = binary_case
  p = _np_sigmoid(logits[..., 0].astype(np.float64))
  inter = (p * mask).sum((1, 2))
  sums = p.sum((1, 2)) + mask.sum((1, 2))
  dice_ref = np.mean(1 - (2 * inter + 1) / (sums + 1))
  iou_ref = np.mean(1 - (inter + 1) / (sums - inter + 1))
  np.testing.assert_allclose(sl.dice_loss(logits, mask), dice_ref, rtol=1e-5)
  np.testing.assert_allclose(sl.iou_loss(logits, mask), iou_ref, rtol=1e-5)


def test_multiclass_iou_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 6, 5))
  p = _np_softmax(logits.astype(np.float64))
  t = np.eye(4)[labels]
  inter = (p * t).sum((1, 2))
  union = p.sum((1, 2)) + t.sum((1, 2)) - inter
  ref = np.mean(1 - ((inter + 1) / (union + 1)).mean(-1))
  np.testing.assert_allclose(sl.iou_loss(logits, labels), ref, rtol=1e-5)
  ref_fg = np.mean(1 - ((inter + 1) / (union + 1))[:, 1:].mean(-1))
  np.testing.assert_allclose(sl.iou_loss(logits, labels, include_background=False), ref_fg,
                             rtol=1e-5)


def test_bce_matches_numpy_and_mask_shapes(binary_case):
  logits, mask = binary_case
  x = logits[..., 0].astype(np.float64)
  p = _np_sigmoid(x)
  ref = np.mean(-(mask * np.log(p) + (1 - mask) * np.log(1 - p)))
  np.testing.assert_allclose(sl.bce_loss(logits, mask), ref, rtol=1e-5)
  np.testing.assert_allclose(sl.bce_loss(logits, mask[..., None]), ref, rtol=1e-5)
  with pytest.raises(ValueError, match="shape"):
    sl.bce_loss(logits, mask[:, :8])


def test_softmax_ce_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 5, 5))
  logp = np.log(_np_softmax(logits.astype(np.float64)))
  ref = -np.mean(np.take_along_axis(logp, labels[..., None], -1))
  np.testing.assert_allclose(sl.softmax_ce_loss(logits, labels), ref, rtol=1e-5)
  np.testing.assert_allclose(sl.cross_entropy_loss(logits, labels), ref, rtol=1e-5)


def test_iou_bce_is_eq9_sum(binary_case):
  logits, mask = binary_case
  np.testing.assert_allclose(sl.iou_bce_loss(logits, mask),
                             sl.iou_loss(logits, mask) + sl.bce_loss(logits, mask), rtol=1e-6)


@pytest.mark.parametrize("name", ["bce_loss", "dice_loss", "iou_loss", "iou_bce_loss",
                                  "dice_ce_loss"])
def test_zero_weights_ignore_padding_examples(binary_case, name):
  loss = getattr(sl, name)
  logits, mask = binary_case
  padded_logits = logits.copy()
  padded_logits[2] = 1e3  # garbage in the padding example
  w = np.array([1.0, 1.0, 0.0], np.float32)
  np.testing.assert_allclose(loss(padded_logits, mask, weights=w),
                             loss(logits[:2], mask[:2]), rtol=1e-5)
  w2 = np.array([2.0, 1.0, 0.0], np.float32)
  ref = (2 * loss(logits[:1], mask[:1]) + loss(logits[1:2], mask[1:2])) / 3
  np.testing.assert_allclose(loss(logits, mask, weights=w2), ref, rtol=1e-5)


def test_bf16_logits_jit_and_finite_grads(binary_case):
  logits, mask = binary_case
  out = sl.iou_bce_loss(jnp.asarray(logits, jnp.bfloat16), mask)
  assert out.dtype == jnp.float32
  grads = jax.jit(jax.grad(_sl.iou_bce_loss))(jnp.asarray(logits), mask)
  assert np.isfinite(np.asarray(grads)).all() and np.abs(grads).sum() > 0


def test_multiclass_mask_shape_is_checked():
  with pytest.raises(ValueError, match="integer labels"):
    sl.dice_loss(np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4, 3), np.int32))
