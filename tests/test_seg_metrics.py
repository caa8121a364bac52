"""Confusion-matrix segmentation scores: mean Dice/IoU, precision, recall, pixel accuracy."""
import numpy as np
import pytest

from medrep_jax.eval import metrics as M


def _hand_case():
  # Pixels (true, pred): (0,0) (0,1) (1,1) | (1,0) (2,2) (2,0); class 3 occurs nowhere.
  true = np.array([[[0, 0, 1]], [[1, 2, 2]]])
  pred = np.array([[[0, 1, 1]], [[0, 2, 0]]])
  return true, pred


def test_confusion_scores_hand_case_with_an_absent_class():
  true, pred = _hand_case()
  cm = M.confusion_matrix(true, pred, 4)
  np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
  s = M.confusion_scores(cm)
  # TP (1, 1, 1), FP (2, 1, 0), FN (1, 1, 1) for classes 0, 1, 2.
  want = {"dice": [2 / 5, 2 / 4, 2 / 3], "iou": [1 / 4, 1 / 3, 1 / 2],
          "precision": [1 / 3, 1 / 2, 1.0], "recall": [1 / 2, 1 / 2, 1 / 2]}
  for name, values in want.items():
    np.testing.assert_allclose([s[f"{name}/{c}"] for c in range(3)], values)
    assert np.isnan(s[f"{name}/3"])  # absent in both: NaN, left out of the mean
    assert s[f"mean_{name}"] == pytest.approx(np.mean(values))
  assert s["accuracy"] == pytest.approx(3 / 6)
  fg = M.confusion_scores(cm, include_background=False)
  assert fg["mean_dice"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert fg["mean_iou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert fg["dice/0"] == s["dice/0"] and fg["accuracy"] == s["accuracy"]


def test_missed_and_spurious_classes_score_zero_not_nan():
  # Class 1: in the target, never predicted. Class 2: predicted, not in the target.
  s = M.confusion_scores(M.confusion_matrix([0, 1, 0, 0], [0, 0, 2, 0], 3))
  assert s["precision/1"] == 0 and s["recall/1"] == 0 and s["dice/1"] == 0
  assert s["precision/2"] == 0 and s["recall/2"] == 0 and s["iou/2"] == 0
  assert s["mean_recall"] == pytest.approx((2 / 3 + 0 + 0) / 3)
  assert s["recall/0"] == pytest.approx(2 / 3) and s["precision/0"] == pytest.approx(2 / 3)
  assert np.isnan(M.confusion_scores(np.zeros((2, 2)))["mean_dice"])
  assert np.isnan(M.confusion_scores(np.zeros((2, 2)))["accuracy"])


def test_batches_add_up_and_match_a_loop_reference():
  rng = np.random.default_rng(0)
  true = rng.integers(0, 3, (6, 8, 8))
  pred = np.where(rng.uniform(size=true.shape) < 0.7, true, rng.integers(0, 3, true.shape))
  valid = rng.uniform(size=true.shape) < 0.8
  whole = M.confusion_matrix(true, pred, 3, valid=valid)
  parts = sum(M.confusion_matrix(true[s], pred[s], 3, valid=valid[s])
              for s in (slice(0, 2), slice(2, 6)))
  np.testing.assert_array_equal(whole, parts)
  ref = np.zeros((3, 3), np.int64)
  for t, p, v in zip(true.ravel(), pred.ravel(), valid.ravel()):
    ref[t, p] += v
  np.testing.assert_array_equal(whole, ref)
  assert M.confusion_scores(parts) == M.confusion_scores(whole)
  one = M.confusion_scores(M.confusion_matrix(true[:1], pred[:1], 3, valid=valid[:1]))
  assert one["accuracy"] == pytest.approx(M.pixel_accuracy(pred[:1], true[:1], valid[:1]))


def test_confusion_matrix_rejects_bad_input():
  with pytest.raises(ValueError, match="outside the 2 classes"):
    M.confusion_matrix([0, 255], [0, 1], 2)
  with pytest.raises(ValueError, match="one shape"):
    M.confusion_matrix(np.zeros((2, 3)), np.zeros((2, 4)), 2)
  with pytest.raises(ValueError, match=r"\(K, K\)"):
    M.confusion_scores(np.zeros((2, 3)))
