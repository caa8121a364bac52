"""Tests for medrep_jax.eval.metrics (vs brute force) and medrep_jax.eval.figures."""
import itertools
import math

import numpy as np
import pytest
from PIL import Image

from medrep_jax.eval import figures
from medrep_jax.eval import metrics as M


# ---------------------------------------------------------------- references


def _pairwise_auc(scores, targets):
  """O(N^2) definition: P(score_pos > score_neg) + 0.5 P(tie)."""
  pos, neg = scores[targets == 1], scores[targets == 0]
  wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


def _loop_ece(probs, labels, bins=15):
  conf, pred = probs.max(1), probs.argmax(1)
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    sel = (conf > lo) & (conf <= hi) if b > 0 else (conf <= hi)
    if sel.any():
      total += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
  return total


def _loop_boundary(mask):
  h, w = mask.shape
  pts = []
  for i, j in zip(*np.nonzero(mask)):
    for di, dj in itertools.product((-1, 0, 1), repeat=2):
      a, b = i + di, j + dj
      if not (0 <= a < h and 0 <= b < w) or not mask[a, b]:
        pts.append((i, j))
        break
  return np.array(pts, np.float64)


def _brute_hd95(a, b):
  pa, pb = _loop_boundary(a), _loop_boundary(b)
  d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
  return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


# ---------------------------------------------------------- classification


def test_average_ranks_with_ties():
  np.testing.assert_allclose(M.average_ranks(np.array([3, 1, 3, 2, 3])), [4, 1, 4, 2, 4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pairwise_definition_with_ties(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, size=60).astype(float)  # many ties
  targets = rng.integers(0, 2, size=60)
  assert M.roc_auc(scores, targets) == pytest.approx(_pairwise_auc(scores, targets))


def test_roc_auc_edge_cases():
  assert M.roc_auc([0.1, 0.9], [0, 1]) == 1.0
  assert M.roc_auc([0.9, 0.1], [0, 1]) == 0.0
  assert M.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
  assert math.isnan(M.roc_auc([0.2, 0.3], [1, 1]))


def test_multilabel_auc_skips_constant_classes():
  rng = np.random.default_rng(3)
  probs = rng.random((40, 3))
  targets = rng.integers(0, 2, size=(40, 3))
  targets[:, 1] = 1
  mean, per = M.multilabel_auc(probs, targets, return_per_class=True)
  assert math.isnan(per[1])
  ref = [_pairwise_auc(probs[:, k], targets[:, k]) for k in (0, 2)]
  assert mean == pytest.approx(np.mean(ref))
  assert math.isnan(M.multilabel_auc(probs, np.ones_like(targets)))


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_loop(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(200, 4)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  labels = rng.integers(0, 4, size=200)
  assert M.ece(probs, labels) == pytest.approx(_loop_ece(probs, labels))
  # Binary P(class 1) gives the same as the two-column form.
  p1 = rng.random(100)
  y = rng.integers(0, 2, size=100)
  two = np.stack([1 - p1, p1], 1)
  assert M.ece(p1, y) == pytest.approx(_loop_ece(two, y))


def test_ece_perfectly_calibrated_and_pixelwise():
  # Confidence 1 and always right: ECE 0; confidence 1 and always wrong: ECE 1.
  probs = np.eye(3)[[0, 1, 2, 1]]
  assert M.ece(probs, np.array([0, 1, 2, 1])) == 0.0
  assert M.ece(probs, np.array([1, 2, 0, 0])) == 1.0
  seg_probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 5, 6))
  seg_labels = np.random.default_rng(1).integers(0, 3, size=(2, 5, 6))
  assert M.ece(seg_probs, seg_labels) == pytest.approx(
      _loop_ece(seg_probs.reshape(-1, 3), seg_labels.ravel()))


def test_confusion_matrix_hand_case():
  cm = M.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_classification_metrics_hand_case_multiclass():
  labels = np.array([0, 0, 1, 2, 2, 2])
  preds = np.array([0, 1, 1, 2, 0, 2])
  probs = np.full((6, 3), 0.1)
  probs[np.arange(6), preds] = 0.8
  m = M.classification_metrics(probs, labels, 3)
  assert m["accuracy"] == pytest.approx(4 / 6)
  prec = [1 / 2, 1 / 2, 2 / 2]
  rec = [1 / 2, 1 / 1, 2 / 3]
  f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
  assert m["precision"] == pytest.approx(np.mean(prec))
  assert m["recall"] == pytest.approx(np.mean(rec))
  assert m["f1"] == pytest.approx(np.mean(f1))
  ovr = [_pairwise_auc(probs[:, k], (labels == k).astype(int)) for k in range(3)]
  assert m["auc"] == pytest.approx(np.mean(ovr))
  assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6))
  assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_classification_metrics_binary_and_absent_class():
  rng = np.random.default_rng(5)
  p1 = rng.random(50)
  labels = rng.integers(0, 2, size=50)
  m = M.classification_metrics(p1, labels, 2)
  assert m["auc"] == pytest.approx(_pairwise_auc(p1, labels))
  assert m["accuracy"] == pytest.approx(np.mean((p1 >= 0.5) == labels))
  # A class never predicted and never present scores 0 in the macro averages.
  probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
  m = M.classification_metrics(probs, np.array([0, 1]), 3)
  assert m["precision"] == pytest.approx(2 / 3)
  assert m["auc"] == pytest.approx(1.0)  # class 2 skipped in one-vs-rest
  with pytest.raises(ValueError, match="num_classes"):
    M.classification_metrics(probs, np.array([0, 1]), 4)


# ------------------------------------------------------------ segmentation


def test_dice_iou_hand_cases():
  true = np.zeros((3, 4, 4), int)
  pred = np.zeros((3, 4, 4), int)
  true[0, :2, :2] = 1            # 4 px
  pred[0, :2, :] = 1             # 8 px, overlap 4: dice 8/12, iou 4/8
  true[1, 0, 0] = 1              # pred empty: dice 0, iou 0
  # image 2: both empty: dice = iou = 1
  m = M.segmentation_metrics(pred, true, 2)
  assert m["dice"] == pytest.approx((8 / 12 + 0 + 1) / 3)
  assert m["iou"] == pytest.approx((4 / 8 + 0 + 1) / 3)
  assert m["hd95_excluded"] == 2


def test_dice_iou_multiclass_average_over_foreground():
  true = np.array([[[1, 1, 2, 2], [0, 0, 0, 0]]])
  pred = np.array([[[1, 1, 2, 0], [0, 0, 0, 0]]])
  m = M.segmentation_metrics(pred, true, 3)
  assert m["dice"] == pytest.approx((1.0 + 2 / 3) / 2)
  assert m["iou"] == pytest.approx((1.0 + 1 / 2) / 2)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_of_offset_squares_is_offset(k):
  a = np.zeros((48, 48), bool)
  a[10:30, 10:30] = True
  b = np.roll(a, k, axis=1)
  assert M.hd95(a, b) == pytest.approx(k)
  assert M.hd95(a, a) == 0.0
  m = M.segmentation_metrics(np.stack([a, a]).astype(int), np.stack([b, a]).astype(int), 2)
  assert m["hd95"] == pytest.approx(k / 2)
  assert m["hd95_excluded"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:24, :24]
  blobs = []
  for _ in range(2):
    cy, cx, r = rng.integers(6, 18), rng.integers(6, 18), rng.integers(3, 7)
    blobs.append(((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) | (rng.random((24, 24)) < 0.03))
  assert M.hd95(*blobs) == pytest.approx(_brute_hd95(*blobs))
  assert M.hd95(blobs[0], blobs[1], spacing=(2.0, 2.0)) == pytest.approx(2 * _brute_hd95(*blobs))


def test_hd95_empty_is_nan_and_all_excluded():
  a = np.zeros((1, 8, 8), int)
  b = a.copy()
  b[0, 2:4, 2:4] = 1
  assert math.isnan(M.hd95(a[0], b[0]))
  m = M.segmentation_metrics(a, b, 2)
  assert math.isnan(m["hd95"]) and m["hd95_excluded"] == 1
  with pytest.raises(ValueError):
    M.segmentation_metrics(a, b[:, :4], 2)


def _loop_region_metrics(pred, true, valid, num_classes):
  """Dice, IoU and pixel accuracy from the pixels inside `valid`, one image at a time."""
  dice, iou, acc = [], [], []
  for c in range(1, num_classes):
    d, j = [], []
    for i in range(pred.shape[0]):
      p, t = pred[i][valid[i] > 0] == c, true[i][valid[i] > 0] == c
      both, either, total = int((p & t).sum()), int((p | t).sum()), int(p.sum() + t.sum())
      d.append(1.0 if total == 0 else 2 * both / total)
      j.append(1.0 if either == 0 else both / either)
    dice.append(np.mean(d))
    iou.append(np.mean(j))
  for i in range(pred.shape[0]):
    inside = valid[i] > 0
    if inside.any():
      acc.append(np.mean(pred[i][inside] == true[i][inside]))
  return np.mean(dice), np.mean(iou), np.mean(acc)


@pytest.mark.parametrize("seed,num_classes", [(0, 2), (1, 3), (2, 2)])
def test_region_metrics_match_numpy_reference(seed, num_classes):
  rng = np.random.default_rng(seed)
  true = rng.integers(0, num_classes, (4, 12, 10))
  pred = np.where(rng.random(true.shape) < 0.7, true, rng.integers(0, num_classes, true.shape))
  yy, xx = np.mgrid[:12, :10]
  valid = np.broadcast_to(((yy - 6) ** 2 + (xx - 5) ** 2 <= 20), true.shape).copy()
  valid[3] = False  # an image with no valid pixel: no accuracy, Dice and IoU of empty = 1
  m = M.segmentation_metrics(pred, true, num_classes, valid=valid.astype(np.uint8))
  dice, iou, acc = _loop_region_metrics(pred, true, valid, num_classes)
  assert m["dice"] == pytest.approx(dice)
  assert m["iou"] == pytest.approx(iou)
  assert m["pixel_accuracy"] == pytest.approx(acc)
  everywhere = np.ones_like(valid)
  full = M.segmentation_metrics(pred, true, num_classes)
  dice, iou, acc = _loop_region_metrics(pred, true, everywhere, num_classes)
  assert (full["dice"], full["iou"]) == (pytest.approx(dice), pytest.approx(iou))
  assert full["pixel_accuracy"] == pytest.approx(acc)
  assert full == M.segmentation_metrics(pred, true, num_classes, valid=everywhere)
  hd = M.segmentation_metrics(pred, true, num_classes, valid=valid)["hd95"]
  masked = M.segmentation_metrics(np.where(valid, pred, 0), np.where(valid, true, 0),
                                  num_classes)["hd95"]
  assert hd == pytest.approx(masked, nan_ok=True)


def test_pixel_accuracy_hand_case_and_errors_outside_the_region():
  true = np.zeros((2, 2, 4), int)
  pred = np.zeros((2, 2, 4), int)
  true[0, 0, :2] = 1             # image 0: pred misses 2 of 8 pixels -> 6/8
  pred[1, :, 3] = 1              # image 1: 2 false positives in column 3 -> 6/8
  assert M.pixel_accuracy(pred, true) == pytest.approx(0.75)
  valid = np.ones((2, 2, 4), bool)
  valid[:, :, 3] = False         # the false positives lie outside the field of view
  assert M.pixel_accuracy(pred, true, valid) == pytest.approx((4 / 6 + 1.0) / 2)
  m = M.segmentation_metrics(pred, true, 2, valid=valid)
  assert m["dice"] == pytest.approx((0.0 + 1.0) / 2)  # image 1 is empty inside: 1
  assert math.isnan(M.pixel_accuracy(pred, true, np.zeros_like(valid)))
  with pytest.raises(ValueError, match=r"ROI.*\(2, 4\)"):
    M.segmentation_metrics(pred, true, 2, valid=valid[0])


# ----------------------------------------------------------------- figures


def _png_size(path):
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    return im.size


def test_figures_write_readable_pngs(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(10, 32, 32, 3)) * 50 + 100
  true = (rng.random((10, 32, 32)) > 0.7).astype(int)
  pred = np.roll(true, 2, axis=1) * 2

  p = figures.segmentation_overlay_grid(images, true, pred, tmp_path / "sub" / "ov.png",
                                        max_items=4, title="val")
  w, h = _png_size(p)
  assert 500 <= w <= 800 and 400 <= h <= 600, (w, h)

  p = figures.confusion_matrix_figure(np.array([[5, 1], [2, 7]]), ["a", "b"],
                                      tmp_path / "cm.png", normalize=True)
  w, h = _png_size(p)
  assert 250 <= w <= 500 and 250 <= h <= 500, (w, h)

  p = figures.image_grid(images[:5, ..., :1], tmp_path / "grid.png", nrow=3,
                         titles=[str(i) for i in range(5)])
  w, h = _png_size(p)
  assert 400 <= w <= 600 and 250 <= h <= 400, (w, h)

  p = figures.curve_figure(np.arange(20), {"train": np.exp(-np.arange(20) / 5),
                                           "eval": np.exp(-np.arange(10) / 4)},
                           str(tmp_path / "curve.png"), xlabel="step", ylabel="loss", logy=True)
  assert _png_size(p) == (500, 350)


def test_overlay_colors_foreground_only():
  img = np.zeros((6, 6))
  mask = np.zeros((6, 6), int)
  mask[2:5, 2:5] = 1
  out = figures.overlay_mask(img, mask)
  assert out.shape == (6, 6, 3)
  np.testing.assert_array_equal(out[0, 0], 0.0)  # background untouched
  assert out[3, 3].sum() > 0 and out[2, 2].sum() > out[3, 3].sum()  # boundary opaque


def test_finetune_segmentation_eval_scores_inside_the_roi(tmp_path):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from medrep_jax.methods import base, finetune  # pylint: disable=g-import-not-at-top
  method = finetune.Finetune(load_config("finetune", "size=tiny,task=segmentation,data=phantoms"),
                             tmp_path)
  rng = np.random.default_rng(5)
  true = rng.integers(0, 2, (3, 8, 8)).astype(np.uint8)
  pred = true.copy()
  pred[:, :, 6:] = 1 - pred[:, :, 6:]  # every error lies in the last two columns
  roi = np.ones_like(true)
  roi[:, :, 6:] = 0
  outputs = {"index": np.arange(3), "pred": pred, "mask": true,
             "prob": pred.astype(np.float16)}
  ctx = base.EvalContext(workdir=tmp_path, step=0, final=False, split="val")
  num_classes = max(2, method.info.num_mask_classes)
  plain = method.evaluate(outputs, None, ctx).metrics
  want = M.segmentation_metrics(pred, true, num_classes)
  assert plain["dice"] == pytest.approx(want["dice"]) and want["dice"] < 1
  assert plain["pixel_accuracy"] == pytest.approx(0.75)
  inside = method.evaluate({**outputs, "roi": roi}, None, ctx).metrics
  assert inside["dice"] == pytest.approx(1.0) and inside["pixel_accuracy"] == 1.0
  assert inside["ece_pixel"] == pytest.approx(M.ece(pred[roi > 0].astype(np.float32),
                                                     true[roi > 0].astype(np.int64)))


def test_psnr_matches_numpy_inside_jit():
  import jax
  rng = np.random.default_rng(0)
  x, y = rng.random((3, 4, 4, 1)), rng.random((3, 4, 4, 1))
  want = [10 * np.log10(4.0 / np.mean((a - b) ** 2)) for a, b in zip(x, y)]
  np.testing.assert_allclose(jax.jit(lambda a, b: M.psnr(a, b, 2.0))(x, y), want, rtol=1e-5)
  assert float(M.psnr(x[:1], x[:1])[0]) == pytest.approx(100.0)  # mse floored at 1e-10


def test_paired_bar_figure_draws_error_bars_and_negative_values(tmp_path):
  path = figures.paired_bar_figure({"all": {"GLCM": [-0.2, 0.8], "ID": [0.5, 0.9]}},
                                   ["baseline", "model"], tmp_path / "bars.png",
                                   errors={"all": {"GLCM": [0.1, 0.05], "ID": [0.2, 0.1]}},
                                   value_labels=False)
  assert Image.open(path).size[0] > 100


# ---------------------------------------------------------------- AUC-PR, joint accuracy


def _loop_ap(scores, targets):
  """Average precision by its definition: for each distinct threshold t, highest first,
  add (recall(t) - previous recall) * precision(t), predicting positive when score >= t."""
  total, prev_recall = 0.0, 0.0
  for t in sorted(set(scores.tolist()), reverse=True):
    predicted = scores >= t
    tp = np.sum(predicted & (targets == 1))
    precision, recall = tp / predicted.sum(), tp / np.sum(targets == 1)
    total += (recall - prev_recall) * precision
    prev_recall = recall
  return total


def test_average_precision_hand_cases_with_ties():
  # Thresholds 0.9, 0.8, 0.3 (the two 0.8 scores enter together):
  #   0.9: TP 1, FP 0 -> P 1,   R 1/2
  #   0.8: TP 2, FP 1 -> P 2/3, R 1
  #   0.3: TP 2, FP 2 -> P 1/2, R 1 (recall unchanged: adds 0)
  # AP = (1/2 - 0) * 1 + (1 - 1/2) * 2/3 = 5/6.
  assert M.average_precision([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]) == pytest.approx(5 / 6)
  # A tie group of one negative among two positives, 3 positives in all:
  #   0.9: TP 0, FP 1 -> P 0,   R 0
  #   0.8: TP 2, FP 2 -> P 1/2, R 2/3
  #   0.3: TP 3, FP 2 -> P 3/5, R 1
  # AP = 2/3 * 1/2 + 1/3 * 3/5 = 8/15; ranking the tie's positives first would give
  # 53/90 and last 43/90, so the grouping is what is tested.
  scores, targets = [0.9, 0.8, 0.8, 0.8, 0.3], [0, 1, 0, 1, 1]
  assert M.average_precision(scores, targets) == pytest.approx(8 / 15)
  assert M.average_precision(np.array(scores)[::-1], np.array(targets)[::-1]) == (
      pytest.approx(8 / 15))  # the input order does not matter


def test_average_precision_edge_cases_and_reference():
  assert M.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(
      0.5 * 1 + 0.5 * 2 / 3)
  assert M.average_precision([0.9, 0.7, 0.2, 0.1], [1, 1, 0, 0]) == 1.0  # perfect ranking
  assert M.average_precision([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(2 / 3)  # one tie
  assert M.average_precision([0.2, 0.3], [1, 1]) == 1.0
  assert math.isnan(M.average_precision([0.2, 0.3], [0, 0]))
  with pytest.raises(ValueError, match="one size"):
    M.average_precision([0.2, 0.3], [0, 1, 1])
  rng = np.random.default_rng(4)
  for _ in range(5):
    scores = rng.integers(0, 6, size=50).astype(float)  # many ties
    targets = rng.integers(0, 2, size=50)
    assert M.average_precision(scores, targets) == pytest.approx(_loop_ap(scores, targets))


def test_multilabel_average_precision_and_classification_metrics():
  rng = np.random.default_rng(6)
  probs = rng.random((40, 3))
  targets = rng.integers(0, 2, size=(40, 3))
  targets[:, 1] = 0
  mean, per = M.multilabel_average_precision(probs, targets, return_per_class=True)
  assert math.isnan(per[1])
  assert mean == pytest.approx(np.mean([_loop_ap(probs[:, k], targets[:, k]) for k in (0, 2)]))
  assert M.average_precision(probs, targets) == pytest.approx(mean)  # (N, K): macro
  p1, labels = probs[:, 0], targets[:, 0]
  assert M.classification_metrics(p1, labels, 2)["auc_pr"] == pytest.approx(_loop_ap(p1, labels))
  multi = rng.dirichlet(np.ones(3), size=30)
  y = rng.integers(0, 3, size=30)
  want = np.mean([_loop_ap(multi[:, k], (y == k).astype(int)) for k in range(3)])
  assert M.classification_metrics(multi, y, 3)["auc_pr"] == pytest.approx(want)


def test_joint_accuracy():
  grade_true, grade_pred = [0, 2, 3, 1, 4], [0, 2, 1, 1, 4]
  edema_true, edema_pred = [0, 1, 2, 0, 2], [0, 1, 2, 1, 2]
  # Both right for images 0, 1 and 4 (2 has the grade wrong, 3 the edema risk): 3/5.
  assert M.joint_accuracy((grade_true, grade_pred), (edema_true, edema_pred)) == 0.6
  assert M.joint_accuracy((grade_true, grade_pred)) == 0.8
  assert M.joint_accuracy((grade_true, grade_true), (edema_true, edema_true)) == 1.0
  assert math.isnan(M.joint_accuracy(([], [])))
  with pytest.raises(ValueError, match="one shape"):
    M.joint_accuracy((grade_true, grade_pred[:4]), (edema_true, edema_pred))
  with pytest.raises(ValueError, match="pair 0 has"):
    M.joint_accuracy((grade_true, grade_pred), (edema_true[:4], edema_pred[:4]))
  with pytest.raises(ValueError, match="at least one"):
    M.joint_accuracy()
