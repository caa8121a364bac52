"""Radiomic features for the LTDiff++ evaluation, checked against IBSI 1.

``extract(image, mask)`` returns one flat dict. Keys are ``"<class>.<tag>"``: the class is
one of the LTDiff++ paper's six feature classes (Table I) and the tag is the IBSI 1
submission-table tag, with the aggregation suffix for texture features:

| class   | what                                   | IBSI family (code)              | tags          |
|---------|----------------------------------------|---------------------------------|---------------|
| `ID`    | intensity direct = first-order stats   | intensity statistics (UHIW)     | `stat_*`      |
| `IH`    | intensity histogram                    | intensity histogram (ZVCW)      | `ih_*`        |
| `GLCM`  | grey level co-occurrence matrix        | GLCM (LFYI)                     | `cm_*_<agg>`  |
| `GLRLM` | grey level run length matrix           | GLRLM (TP0I)                    | `rlm_*_<agg>` |
| `NID`   | neighbourhood intensity difference     | NGTDM (IPET)                    | `ngt_*_<agg>` |
| `GOH`   | gradient-orientation histogram         | none; defined in ``goh``        | `goh_*`       |

e.g. ``"ID.stat_mean"``, ``"GLCM.cm_joint_max_3D_avg"``, ``"NID.ngt_coarseness_2D"``.
Aggregation suffixes and their IBSI codes are in ``texture.AGGREGATIONS`` and
``texture.NEIGHBOURHOOD_AGGREGATIONS``. Settings follow IBSI 1's digital phantom: GLCM
symmetric at Chebyshev distance 1, NGTDM at Chebyshev distance 1, only ROI voxels as
neighbours, no interpolation or re-segmentation. Everything is host-side NumPy.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from medrep_jax.eval.radiomics import discretise, first_order, glcm, glrlm, goh, ngtdm, texture
from medrep_jax.eval.radiomics.discretise import fixed_bin_number, fixed_bin_size, grey_levels
from medrep_jax.eval.radiomics.texture import AGGREGATIONS, NEIGHBOURHOOD_AGGREGATIONS

CLASSES = ("GOH", "GLCM", "GLRLM", "ID", "IH", "NID")  # the column order of Table I
# IBSI family name (the reference CSV's `family` column) -> the paper's class.
FEATURE_CLASS = {"intensity_statistics": "ID", "intensity_histogram": "IH", "GLCM": "GLCM",
                 "GLRLM": "GLRLM", "NGTDM": "NID", "GOH": "GOH"}
# Tag prefix -> class, for bare tags such as "cm_joint_max_2D_avg".
TAG_PREFIX_CLASS = {"stat": "ID", "ih": "IH", "cm": "GLCM", "rlm": "GLRLM", "ngt": "NID",
                    "goh": "GOH"}

__all__ = ["AGGREGATIONS", "CLASSES", "FEATURE_CLASS", "NEIGHBOURHOOD_AGGREGATIONS",
           "TAG_PREFIX_CLASS", "default_aggregations", "extract", "feature_class",
           "fixed_bin_number", "fixed_bin_size", "grey_levels", "stack",
           # the family modules
           "discretise", "first_order", "glcm", "glrlm", "goh", "ngtdm", "texture"]


def feature_class(name: str) -> str:
  """The class of a feature key ("GLCM.cm_energy_3D_avg") or bare tag ("cm_energy_3D_avg")."""
  if "." in name:
    cls = name.split(".", 1)[0]
    if cls in CLASSES:
      return cls
  prefix = name.split(".")[-1].split("_", 1)[0]
  if prefix not in TAG_PREFIX_CLASS:
    raise KeyError(f"feature {name!r} belongs to none of the classes {CLASSES}")
  return TAG_PREFIX_CLASS[prefix]


def default_aggregations(ndim: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(GLCM/GLRLM, NGTDM) aggregation suffixes: the 2-D ones for an image, all for a volume."""
  if ndim == 2:
    return ("2D_avg", "2D_comb"), ("2D",)
  return tuple(AGGREGATIONS), tuple(NEIGHBOURHOOD_AGGREGATIONS)


def _check(image: np.ndarray, mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
  image, mask = np.asarray(image), np.asarray(mask)
  if image.shape != mask.shape or image.ndim not in (2, 3):
    raise ValueError(f"image {image.shape} and mask {mask.shape} must share one 2-D (X, Y) "
                     "or 3-D (X, Y, Z) shape, z the slice axis")
  roi = mask != 0
  if not roi.any():
    raise ValueError(f"the mask of shape {mask.shape} selects no voxel")
  if not np.isfinite(image).all():  # GOH's differences reach outside the ROI
    raise ValueError(f"the image of shape {image.shape} holds "
                     f"{int((~np.isfinite(image)).sum())} non-finite values")
  if spacing is not None and (len(spacing) != image.ndim or min(spacing) <= 0):
    raise ValueError(f"spacing {tuple(spacing)} needs one positive entry per axis of the "
                     f"image shape {image.shape}")
  return image, roi


def extract(image: np.ndarray, mask: np.ndarray, *, spacing: Sequence[float] | None = None,
            n_bins: int | None = None, bin_width: float | None = None,
            lo: float | None = None, hi: float | None = None,
            aggregations: Iterable[str] | None = None,
            ngtdm_aggregations: Iterable[str] | None = None,
            classes: Iterable[str] = CLASSES, goh_bins: int = 8,
            goh_weighted: bool = True) -> dict[str, float]:
  """Every feature of the requested ``classes`` for one ROI, keyed ``"<class>.<tag>"``.

  Args:
    image, mask: (X, Y) or (X, Y, Z) arrays, z the slice axis; the ROI is ``mask != 0``.
    spacing: voxel spacing, one entry per axis; only GOH uses it (texture matrices count
      voxels, as IBSI defines them).
    n_bins / bin_width / lo / hi: discretisation for IH and the texture classes, fixed bin
      number or fixed bin size (``discretise.grey_levels``); neither means the ROI already
      holds integer grey levels >= 1. ID always uses the raw intensities.
    aggregations, ngtdm_aggregations: suffixes for GLCM/GLRLM and for NGTDM; default
      ``default_aggregations(image.ndim)``.
    classes: a subset of ``CLASSES`` to compute.
    goh_bins, goh_weighted: GOH histogram bins and magnitude weighting (``goh``).
  """
  image, roi = _check(image, mask, spacing)
  classes = tuple(classes)
  unknown = sorted(set(classes) - set(CLASSES))
  if unknown:
    raise ValueError(f"unknown feature classes {unknown}; choose from {CLASSES}")
  aggs, ngt_aggs = default_aggregations(image.ndim)
  aggs = texture.check_aggregations(aggs if aggregations is None else aggregations,
                                    AGGREGATIONS)
  ngt_aggs = texture.check_aggregations(
      ngt_aggs if ngtdm_aggregations is None else ngtdm_aggregations,
      NEIGHBOURHOOD_AGGREGATIONS)
  out: dict[str, float] = {}
  if "ID" in classes:
    out.update({f"ID.{k}": v for k, v in first_order.intensity_statistics(image[roi]).items()})
  if {"IH", "GLCM", "GLRLM", "NID"} & set(classes):
    levels, n_levels = grey_levels(image, roi, n_bins=n_bins, bin_width=bin_width, lo=lo, hi=hi)
    if "IH" in classes:
      ih = first_order.intensity_histogram(levels[roi], n_levels)
      out.update({f"IH.{k}": v for k, v in ih.items()})
    for cls, mod, agg in (("GLCM", glcm, aggs), ("GLRLM", glrlm, aggs),
                          ("NID", ngtdm, ngt_aggs)):
      if cls in classes:
        out.update({f"{cls}.{k}": v for k, v in mod.features(levels, n_levels, agg).items()})
  if "GOH" in classes:
    feats = goh.features(image, roi, n_bins=goh_bins, spacing=spacing, weighted=goh_weighted)
    out.update({f"GOH.{k}": v for k, v in feats.items()})
  return out


def stack(rows: Sequence[Mapping[str, float]]) -> tuple[list[str], np.ndarray]:
  """(names, (n_rois, n_features) array) from ``extract`` dicts that share their keys."""
  if not rows:
    raise ValueError("stack needs at least one feature dict")
  names = list(rows[0])
  for n, row in enumerate(rows):
    if list(row) != names:
      diff = sorted(set(row) ^ set(names))[:5]
      raise ValueError(f"feature dict {n} has other keys than dict 0 (e.g. {diff}); "
                       "extract every ROI with the same settings")
  return names, np.array([[row[k] for k in names] for row in rows], np.float64)
