"""Host-side (NumPy) evaluation metrics for classification and segmentation.

These run on full arrays gathered at evaluation time, are vectorized, and
return plain Python floats (NaN where a metric is undefined), so results can
be written straight to ``metrics.jsonl``.

Classification: accuracy, macro precision/recall/F1, ROC AUC, AUC-PR (average
precision), ECE and the confusion matrix (DCL-CsTP reports ACC, PRE, REC, AUC;
CAMContrast reports mean AUC of multi-label linear probes, AUC-PR, and IDRiD's joint
accuracy of grade and edema risk: ``joint_accuracy``). Segmentation: Dice, IoU, HD95 and pixel
accuracy per image, optionally only inside a region of interest (``valid``, e.g. a field
of view); and data-set-level mean Dice/IoU, per-class precision/recall and pixel accuracy
from a confusion matrix accumulated over batches (``confusion_scores``; DSDM, Table 6).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                     valid: np.ndarray | None = None) -> np.ndarray:
  """(K, K) int64 counts; rows are true labels, columns are predictions.

  Any shape (class labels, or (N, H, W) label maps); with ``valid`` (the same shape),
  only entries where it is nonzero count (a field of view). Counts add, so a data set's
  matrix is the sum of its batches' matrices.
  """
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  if labels.shape != preds.shape:
    raise ValueError(f"labels and preds must have one shape; got {labels.shape}, {preds.shape}")
  if valid is not None:
    keep = _valid_region(valid, labels.shape)
    labels, preds = labels[keep], preds[keep]
  labels, preds = labels.ravel(), preds.ravel()
  for name, x in (("labels", labels), ("preds", preds)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f"{name} hold values in [{x.min()}, {x.max()}], outside the "
                       f"{num_classes} classes [0, {num_classes - 1}]")
  return np.bincount(labels * num_classes + preds,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_scores(cm: np.ndarray, include_background: bool = True) -> dict[str, float]:
  """Segmentation scores of a (K, K) confusion matrix (``confusion_matrix``, summed over
  batches): every pixel of the data set counts once, not each image equally.

  Per class c, with TP, FP and FN counted from the matrix: Dice = 2TP / (2TP + FP + FN),
  IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN).
  Absent classes: a class absent in both target and prediction (TP + FP + FN = 0) has
  NaN scores and is left out of every mean; a class present in one of them scores 0 where
  its ratio is 0/0 (precision of a class never predicted, recall of a class not in the
  target), so missing a class counts against the model.

  Args:
    cm: (K, K) counts, rows true, columns predicted.
    include_background: False leaves class 0 out of the means (the per-class values keep it).

  Returns:
    ``mean_dice``, ``mean_iou``, ``mean_precision``, ``mean_recall`` (means over the
    classes present; NaN if none), ``accuracy`` (pixel accuracy: trace / total, NaN for
    an empty matrix) and per class ``dice/c``, ``iou/c``, ``precision/c``, ``recall/c``.
  """
  cm = np.asarray(cm, np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"a confusion matrix is (K, K); got {cm.shape}")
  tp = np.diag(cm)
  fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
  absent = tp + fp + fn == 0

  def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.where(absent, np.nan, out)

  per_class = {"dice": ratio(2 * tp, 2 * tp + fp + fn), "iou": ratio(tp, tp + fp + fn),
               "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn)}
  out: dict[str, float] = {}
  first = 0 if include_background else 1
  for name, values in per_class.items():
    kept = values[first:][~np.isnan(values[first:])]
    out[f"mean_{name}"] = float(kept.mean()) if kept.size else float("nan")
  total = cm.sum()
  out["accuracy"] = float(tp.sum() / total) if total else float("nan")
  for name, values in per_class.items():
    out.update({f"{name}/{c}": float(v) for c, v in enumerate(values)})
  return out


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x`` with ties given their average rank."""
  x = np.asarray(x).ravel()
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
  ends = np.r_[starts[1:], xs.size]  # exclusive
  avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1..ends
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
  """Binary ROC AUC via the Mann-Whitney U statistic, ties counted as 1/2.

  AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos the sum of the
  average ranks of the positives. NaN if only one class is present.
  """
  scores = np.asarray(scores, np.float64).ravel()
  pos = np.asarray(targets).ravel().astype(bool)
  n_pos = int(pos.sum())
  n_neg = pos.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  r_pos = average_ranks(scores)[pos].sum()
  return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def multilabel_auc(probs: np.ndarray, targets: np.ndarray,
                   return_per_class: bool = False) -> Any:
  """Mean ROC AUC over the K columns of (N, K) ``probs``/``targets``.

  Classes whose targets take one value only are skipped (NaN per class). The
  mean is NaN if every class is skipped. With ``return_per_class`` returns
  ``(mean, per_class_array)``.
  """
  probs = np.asarray(probs, np.float64)
  targets = np.asarray(targets)
  if probs.shape != targets.shape or probs.ndim != 2:
    raise ValueError(f"probs and targets must both be (N, K); got {probs.shape}, {targets.shape}")
  per_class = np.array([roc_auc(probs[:, k], targets[:, k]) for k in range(probs.shape[1])])
  valid = ~np.isnan(per_class)
  mean = float(per_class[valid].mean()) if valid.any() else float("nan")
  return (mean, per_class) if return_per_class else mean


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """Area under the precision-recall curve as average precision (AUC-PR).

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, highest first
  (R_0 = 0): P_n and R_n are the precision and recall of predicting positive every
  score >= the n-th threshold, so equal scores enter together (scikit-learn's
  ``average_precision_score``, no interpolation). NaN if there is no positive. A
  (N, K) input gives the macro mean over its columns (``multilabel_average_precision``).
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim == 2:
    return multilabel_average_precision(scores, targets)
  scores = scores.ravel()
  pos = np.asarray(targets).ravel().astype(bool)
  if scores.shape != pos.shape:
    raise ValueError(f"scores and targets must have one size; got {scores.size}, {pos.size}")
  n_pos = int(pos.sum())
  if n_pos == 0:
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  s, p = scores[order], pos[order]
  last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each tie group
  tp = np.cumsum(p)[last].astype(np.float64)
  precision = tp / (last + 1)
  recall = tp / n_pos
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def multilabel_average_precision(probs: np.ndarray, targets: np.ndarray,
                                 return_per_class: bool = False) -> Any:
  """Mean average precision (AUC-PR) over the K columns of (N, K) ``probs``/``targets``.

  Classes with no positive are skipped (NaN per class); a class whose targets are all
  positive scores 1. The mean is NaN if every class is skipped. With
  ``return_per_class`` returns ``(mean, per_class_array)``.
  """
  probs = np.asarray(probs, np.float64)
  targets = np.asarray(targets)
  if probs.shape != targets.shape or probs.ndim != 2:
    raise ValueError(f"probs and targets must both be (N, K); got {probs.shape}, {targets.shape}")
  per_class = np.array([average_precision(probs[:, k], targets[:, k])
                        for k in range(probs.shape[1])])
  valid = ~np.isnan(per_class)
  mean = float(per_class[valid].mean()) if valid.any() else float("nan")
  return (mean, per_class) if return_per_class else mean


def joint_accuracy(*pairs: tuple[np.ndarray, np.ndarray]) -> float:
  """Fraction of examples whose every task is predicted right (IDRiD's joint grading).

  Each pair is (true labels, predicted labels) of one task, int arrays of one shape for
  every task; CAMContrast's IDRiD joint accuracy is
  ``joint_accuracy((grade_true, grade_pred), (edema_true, edema_pred))``: an image counts
  when both its retinopathy grade and its macular-edema risk are right. NaN for no examples.
  """
  if not pairs:
    raise ValueError("joint_accuracy needs at least one (labels, preds) pair")
  right = None
  for k, pair in enumerate(pairs):
    if len(pair) != 2:
      raise ValueError(f"pair {k} must be (labels, preds); got {len(pair)} arrays")
    labels, preds = (np.asarray(a, np.int64) for a in pair)
    if labels.shape != preds.shape:
      raise ValueError(f"pair {k}: labels and preds must have one shape; got "
                       f"{labels.shape}, {preds.shape}")
    if right is not None and labels.shape != right.shape:
      raise ValueError(f"pair {k} has shape {labels.shape}, but pair 0 has {right.shape}; "
                       "give every task one label per example")
    ok = labels == preds
    right = ok if right is None else right & ok
  return float(right.mean()) if right.size else float("nan")


def _as_class_probs(probs: np.ndarray, label_ndim: int) -> np.ndarray:
  """(..., K) class probabilities; a binary P(class 1) array gets K = 2."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim == label_ndim:
    probs = np.stack([1.0 - probs, probs], axis=-1)
  elif probs.ndim != label_ndim + 1:
    raise ValueError(f"probs must have the labels' shape (binary) or one more axis; "
                     f"got probs {probs.shape} for labels with {label_ndim} dims")
  return probs


def ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
  """Expected calibration error of the top-label confidence (Guo et al., 2017).

  ECE = sum_b (n_b / N) |acc_b - conf_b| over ``num_bins`` equal-width bins
  (lo, hi] of [0, 1] (confidence 0 falls in the first bin). ``probs`` is
  (..., K) with ``labels`` (...), or P(class 1) with the labels' shape; any
  leading shape works, so it also gives pixel-level ECE for segmentation.
  """
  labels = np.asarray(labels)
  p = _as_class_probs(probs, labels.ndim)
  p = p.reshape(-1, p.shape[-1])
  if p.shape[0] == 0:
    return float("nan")
  conf = p.max(axis=1)
  correct = (p.argmax(axis=1) == labels.ravel()).astype(np.float64)
  bins = np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  gap = np.bincount(bins, weights=correct - conf, minlength=num_bins)
  return float(np.abs(gap).sum() / conf.size)


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           num_classes: int) -> dict[str, Any]:
  """Accuracy, macro precision/recall/F1, AUC, AUC-PR, ECE and the confusion matrix.

  Args:
    probs: (N, K) class probabilities, or (N,) P(class 1) for binary tasks.
    labels: (N,) integer labels.
    num_classes: K.

  Returns:
    Floats ``accuracy``, ``precision``, ``recall``, ``f1`` (macro: per-class
    values averaged over the K classes, a class with no predicted or no true
    examples scoring 0 for that term), ``auc`` (binary ROC AUC of P(class 1);
    for K > 2 the macro one-vs-rest AUC over classes present with both
    values; NaN if undefined), ``auc_pr`` (average precision, binary of P(class 1),
    else the macro one-vs-rest mean over classes present; NaN if undefined) and
    ``ece`` (15 bins); for K > 2 also ``auc_<k>``, the one-vs-rest ROC AUC of each
    class k (CAMContrast Table 11's CN / MCI / AD columns; NaN where undefined), plus
    ``confusion_matrix`` as a nested list of ints (rows true, columns pred),
    the one non-scalar entry.
  """
  labels = np.asarray(labels, np.int64).ravel()
  p = _as_class_probs(probs, 1)
  if p.shape != (labels.size, num_classes):
    raise ValueError(f"probs shape {np.shape(probs)} does not fit {labels.size} labels "
                     f"and num_classes={num_classes}")
  preds = p.argmax(axis=1)
  cm = confusion_matrix(labels, preds, num_classes)
  tp = np.diag(cm).astype(np.float64)
  pred_count, true_count = cm.sum(axis=0), cm.sum(axis=1)
  precision = np.divide(tp, pred_count, out=np.zeros_like(tp), where=pred_count > 0)
  recall = np.divide(tp, true_count, out=np.zeros_like(tp), where=true_count > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  per_class = {}
  if num_classes == 2:
    auc = roc_auc(p[:, 1], labels == 1)
    auc_pr = average_precision(p[:, 1], labels == 1)
  else:
    onehot = np.eye(num_classes, dtype=np.int64)[labels]
    auc, aucs = multilabel_auc(p, onehot, return_per_class=True)
    per_class = {f"auc_{k}": float(a) for k, a in enumerate(aucs)}
    auc_pr = multilabel_average_precision(p, onehot)
  return {
      "accuracy": float(tp.sum() / max(labels.size, 1)),
      "precision": float(precision.mean()),
      "recall": float(recall.mean()),
      "f1": float(f1.mean()),
      "auc": auc,
      "auc_pr": auc_pr,
      "ece": ece(p, labels),
      **per_class,
      "confusion_matrix": cm.tolist(),
  }


def _boundary(mask: np.ndarray) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool),
                                        border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> float:
  """95th-percentile symmetric Hausdorff distance between two 2-D boolean masks.

  Boundaries are the mask pixels with a background 8-neighbour (pixels on
  the image border count as boundary). HD95 = max(P95(d(∂A, ∂B)),
  P95(d(∂B, ∂A))), the MedPy/MONAI convention, in pixels (or in ``spacing``
  units). NaN if either mask is empty.
  """
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if not a.any() or not b.any():
    return float("nan")
  ba, bb = _boundary(a), _boundary(b)
  d_to_b = ndimage.distance_transform_edt(~bb, sampling=spacing)
  d_to_a = ndimage.distance_transform_edt(~ba, sampling=spacing)
  return float(max(np.percentile(d_to_b[ba], 95), np.percentile(d_to_a[bb], 95)))


def pixel_accuracy(pred_mask: np.ndarray, true_mask: np.ndarray,
                   valid: np.ndarray | None = None) -> float:
  """Fraction of correctly classified pixels, (TP + TN) / (TP + TN + FP + FN).

  The "Acc" of retinal-vessel papers (e.g. DRFL's eq. 18), for any number of classes:
  per image, the fraction of pixels whose predicted class equals the true class
  (background included), then averaged over images. With ``valid`` (N, H, W), only
  pixels where it is nonzero count (a field-of-view mask); images with no valid
  pixel are left out (NaN if none is left).
  """
  pred, true = np.asarray(pred_mask), np.asarray(true_mask)
  if pred.shape != true.shape or pred.ndim != 3:
    raise ValueError(f"masks must both be (N, H, W); got {pred.shape} and {true.shape}")
  v = _valid_region(valid, pred.shape)
  n = v.sum(axis=(1, 2))
  right = ((pred == true) & v).sum(axis=(1, 2))
  keep = n > 0
  return float((right[keep] / n[keep]).mean()) if keep.any() else float("nan")


def _valid_region(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
  """``valid`` as a boolean (N, H, W) array (all True when None)."""
  if valid is None:
    return np.ones(shape, bool)
  v = np.asarray(valid)
  if v.shape != shape:
    raise ValueError(f"the valid-region (ROI) mask has shape {v.shape}, but the masks are "
                     f"{shape}; pass one (H, W) region per image")
  return v != 0


def segmentation_metrics(pred_mask: np.ndarray, true_mask: np.ndarray, num_classes: int,
                         spacing: Sequence[float] | None = None,
                         valid: np.ndarray | None = None) -> dict[str, float | int]:
  """Mean Dice, mean IoU, mean HD95 over foreground classes, and pixel accuracy.

  Args:
    pred_mask, true_mask: (N, H, W) integer label maps; class 0 is background.
    num_classes: K including background (2 for binary segmentation).
    spacing: optional pixel spacing for HD95.
    valid: optional (N, H, W) region mask (e.g. a field of view, the record's "roi"):
      only pixels where it is nonzero are scored. Outside it, prediction and truth
      both count as background, so Dice, IoU and HD95 see only the inside, and
      ``pixel_accuracy`` counts only inside pixels. None scores every pixel.

  Returns:
    ``dice`` and ``iou``: per image and foreground class Dice = 2|A∩B| /
    (|A| + |B|) and IoU = |A∩B| / |A∪B| (1.0 when both masks are empty),
    averaged over images, then over classes 1..K-1. ``hd95``: see ``hd95``;
    (image, class) pairs where either mask is empty are excluded, averaged
    like Dice over the remaining pairs (NaN if none remain), and
    ``hd95_excluded`` counts the excluded pairs. ``pixel_accuracy``: see
    ``pixel_accuracy``.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
  pred = np.asarray(pred_mask)
  true = np.asarray(true_mask)
  if pred.shape != true.shape or pred.ndim != 3:
    raise ValueError(f"masks must both be (N, H, W); got {pred.shape} and {true.shape}")
  acc = pixel_accuracy(pred, true, valid)
  if valid is not None:
    v = _valid_region(valid, pred.shape)
    pred, true = np.where(v, pred, 0), np.where(v, true, 0)
  dices, ious, hds, excluded = [], [], [], 0
  for c in range(1, num_classes):
    a, b = pred == c, true == c
    inter = np.sum(a & b, axis=(1, 2)).astype(np.float64)
    sa, sb = a.sum(axis=(1, 2)), b.sum(axis=(1, 2))
    union = sa + sb - inter
    empty = (sa + sb) == 0
    dices.append(np.where(empty, 1.0, 2 * inter / np.maximum(sa + sb, 1)).mean())
    ious.append(np.where(empty, 1.0, inter / np.maximum(union, 1)).mean())
    h = np.array([hd95(a[i], b[i], spacing) for i in range(pred.shape[0])])
    excluded += int(np.isnan(h).sum())
    hds.append(np.nanmean(h) if (~np.isnan(h)).any() else np.nan)
  hds = np.asarray(hds, np.float64)
  return {
      "dice": float(np.mean(dices)),
      "iou": float(np.mean(ious)),
      "hd95": float(np.nanmean(hds)) if (~np.isnan(hds)).any() else float("nan"),
      "hd95_excluded": excluded,
      "pixel_accuracy": acc,
  }


def psnr(x, y, data_range: float = 1.0):
  """Per-example PSNR (dB) of (B, ...) images with values in [0, data_range].

  jax.numpy, so it runs inside a jitted eval step (the only array-side metric here).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  diff = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
  mse = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10))
