"""Lin's concordance correlation coefficient (CCC), per feature and per feature class.

rho_c = 2 s_xy / (s_x^2 + s_y^2 + (mu_x - mu_y)^2), with population (1/n) moments
(Lin 1989, Biometrics 45:255-268). It is 1 only for perfect agreement y = x, and a shift
or a scale change between x and y lowers it, unlike Pearson's r.

The LTDiff++ paper's eq. (1) prints the denominator as s_s^2 s_t^2 + (mu_s - mu_t)^2, a
product of the variances; that is a typo, and Lin's sum s_s^2 + s_t^2 is used here.

The paper's Tables I-II give, per feature class, the mean +- std of the per-feature CCC
between standardised (translated) and reference ROIs: ``ccc`` then ``class_summary``.
``groupwise_ccc`` is the "group-wise" option: one CCC per class over all of its features.
"""
from __future__ import annotations

import warnings
from typing import Hashable, Sequence

import numpy as np

ON_CONSTANT = ("warn", "raise", "ignore")


class ConstantFeatureWarning(RuntimeWarning):
  """A feature is constant and equal in both inputs: its CCC is 0/0 and is NaN."""


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim not in (1, 2):
    raise ValueError(f"x {x.shape} and y {y.shape} must share one shape, (n,) or "
                     "(n_rois, n_features)")
  if x.shape[0] < 2:
    raise ValueError(f"CCC needs at least 2 paired observations; x and y have shape {x.shape}")
  for name, a in (("x", x), ("y", y)):
    if not np.isfinite(a).all():
      bad = np.flatnonzero(~np.isfinite(a).reshape(a.shape[0], -1).all(axis=0))
      raise ValueError(f"{name} of shape {a.shape} holds {int((~np.isfinite(a)).sum())} "
                       f"non-finite values (feature columns {bad[:10].tolist()})")
  return x, y


def ccc(x, y, *, names: Sequence[str] | None = None, on_constant: str = "warn"):
  """Lin's CCC of paired samples; (n_rois, n_features) inputs give (n_features,).

  Where a feature is constant in both x and y with the same value, the CCC is 0/0: the
  result is NaN (never a silent 1.0) and ``on_constant`` decides: "warn" (a
  ``ConstantFeatureWarning`` naming the features, from ``names`` or column indices),
  "raise" (ValueError) or "ignore". Constant but different values give 0.
  """
  if on_constant not in ON_CONSTANT:
    raise ValueError(f"on_constant must be one of {ON_CONSTANT}, got {on_constant!r}")
  x, y = _pair(x, y)
  vector = x.ndim == 1
  x2, y2 = (x[:, None], y[:, None]) if vector else (x, y)
  if names is not None and len(names) != x2.shape[1]:
    raise ValueError(f"{len(names)} names for {x2.shape[1]} features of shape {x.shape}")
  mx, my = x2.mean(axis=0), y2.mean(axis=0)
  const_x = np.ptp(x2, axis=0) == 0  # exact: float means of constant columns can drift
  const_y = np.ptp(y2, axis=0) == 0
  vx = np.where(const_x, 0.0, x2.var(axis=0))
  vy = np.where(const_y, 0.0, y2.var(axis=0))
  cov = np.where(const_x | const_y, 0.0, ((x2 - mx) * (y2 - my)).mean(axis=0))
  mean_gap = np.where(const_x & const_y, x2[0] - y2[0], mx - my)
  den = vx + vy + mean_gap ** 2
  degenerate = den == 0
  with np.errstate(divide="ignore", invalid="ignore"):
    out = np.where(degenerate, np.nan, 2 * cov / den)
  if degenerate.any() and on_constant != "ignore":
    cols = np.flatnonzero(degenerate)
    which = [names[c] for c in cols] if names is not None else cols.tolist()
    msg = (f"CCC undefined (0/0) for {len(cols)} feature(s) constant and equal in x and y, "
           f"set to NaN: {which[:20]}{' ...' if len(which) > 20 else ''}")
    if on_constant == "raise":
      raise ValueError(msg)
    warnings.warn(msg, ConstantFeatureWarning, stacklevel=2)
  return float(out[0]) if vector else out


def _classes(classes: Sequence[Hashable], n: int, what: str) -> list:
  classes = list(classes)
  if len(classes) != n:
    raise ValueError(f"{len(classes)} class labels for {what} of {n} features")
  return list(dict.fromkeys(classes))  # first-appearance order


def class_summary(ccc_per_feature, classes: Sequence[Hashable], *,
                  ddof: int = 0) -> dict[Hashable, tuple[float, float, int]]:
  """{class: (mean, std, n)} of the per-feature CCC, the form of the paper's Table I.

  NaN CCCs (undefined features) are left out, and n counts the features that remain; a
  class with none left is (nan, nan, 0). ``ddof`` is passed to the standard deviation.
  """
  values = np.asarray(ccc_per_feature, np.float64)
  if values.ndim != 1:
    raise ValueError(f"ccc_per_feature must be 1-D (n_features,), got shape {values.shape}")
  labels = np.asarray(list(classes), dtype=object)
  out = {}
  for cls in _classes(classes, values.size, "ccc_per_feature"):
    v = values[(labels == cls) & np.isfinite(values)]
    if v.size == 0:
      out[cls] = (float("nan"), float("nan"), 0)
    else:
      std = float(v.std(ddof=ddof)) if v.size > ddof else float("nan")
      out[cls] = (float(v.mean()), std, int(v.size))
  return out


def groupwise_ccc(x, y, classes: Sequence[Hashable], *, standardise: bool = True,
                  names: Sequence[str] | None = None) -> dict[Hashable, float]:
  """One CCC per class over all (ROI, feature) values of its features, pooled.

  With ``standardise`` each feature column is first z-scored with the mean and std of x
  and y pooled (the same transform for both, so a shift between them still lowers the
  CCC, while features in large units do not swamp the rest). Columns constant and equal
  in x and y carry no information and are dropped with a ``ConstantFeatureWarning``.
  """
  x, y = _pair(x, y)
  if x.ndim != 2:
    raise ValueError(f"groupwise_ccc needs (n_rois, n_features) inputs, got {x.shape}")
  labels = np.asarray(list(classes), dtype=object)
  order = _classes(classes, x.shape[1], f"inputs of shape {x.shape}")
  both = np.concatenate([x, y])
  dead = np.ptp(both, axis=0) == 0
  if dead.any():
    which = [names[c] for c in np.flatnonzero(dead)] if names is not None \
        else np.flatnonzero(dead).tolist()
    warnings.warn(f"group-wise CCC drops {int(dead.sum())} feature(s) constant and equal "
                  f"in x and y: {which[:20]}", ConstantFeatureWarning, stacklevel=2)
  if standardise:
    mu, sd = both.mean(axis=0), np.where(dead, 1.0, both.std(axis=0))
    x, y = (x - mu) / sd, (y - mu) / sd
  out = {}
  for cls in order:
    cols = (labels == cls) & ~dead
    if not cols.any():
      out[cls] = float("nan")
      continue
    out[cls] = ccc(x[:, cols].ravel(), y[:, cols].ravel(), on_constant="ignore")
  return out


def format_summary(summary: dict, order: Sequence[Hashable] | None = None) -> str:
  """A markdown table row set "class | mean ± std | n" (Table I style, 2 decimals)."""
  lines = ["| class | CCC | n |", "|---|---|---|"]
  for cls in (order or list(summary)):
    mean, std, n = summary.get(cls, (float("nan"), float("nan"), 0))
    lines.append(f"| {cls} | {mean:.2f} ± {std:.2f} | {n} |")
  return "\n".join(lines)
