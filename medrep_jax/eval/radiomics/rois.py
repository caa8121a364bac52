"""ROIs for the LTDiff++ concordance study (Sec. IV-B): HU-window sampling, paired features.

The paper compares radiomic features of translated (A'), non-standard (A) and reference
(B) CT slices on the whole image and on random ROIs in four HU ranges (``HU_WINDOWS``).

ROIs. ``sample_rois`` draws square boxes (e.g. 24 x 24) whose pixels of the REFERENCE
image B lie inside the HU window for at least ``min_fraction`` of the box; the ROI's
mask is those in-window pixels. The same boxes and masks are then applied to every set
(A, A', B), so features are compared voxel for voxel. "whole" is one ROI per image, the
whole image.

Discretisation (IH, GLCM, GLRLM, NID). Fixed bin number (IBSI FBN) over the window's own
HU range, lo/hi = the window bounds (``RANGES``; "whole" uses ``WHOLE_RANGE``), never the
ROI's extremes: grey level k means the same HU interval in every ROI and every set, so
levels are comparable. ``bin_width`` gives fixed bin size from lo instead. Because the
mask comes from B, A's voxels may leave the window: they are clipped to [lo, hi] for
discretisation only. ID (first-order statistics) and GOH use the raw HU, and GOH's
gradients see a one-pixel ring around the box, as it sees neighbours outside the ROI.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from medrep_jax.eval import concordance
from medrep_jax.eval.radiomics import CLASSES, extract, stack

HU_WINDOWS = {"lung": (-800.0, -300.0), "soft": (-100.0, 250.0),
              "soft_narrow": (10.0, 250.0), "bone": (300.0, 800.0)}  # Sec. IV-B
WHOLE_RANGE = (-1000.0, 1000.0)  # discretisation range of "whole" (and of given masks)
RANGES = {**HU_WINDOWS, "whole": WHOLE_RANGE}
WINDOWS = tuple(RANGES)
_RAW = ("ID", "GOH")  # classes computed on raw HU; the rest on discretised levels


class NoRoiError(ValueError):
  """No box of the requested size has enough reference pixels inside the HU window."""


class Roi(NamedTuple):
  """A box ``image[row:row + h, col:col + w]`` with ``mask`` (h, w) bool selecting the ROI."""
  row: int
  col: int
  mask: np.ndarray

  @property
  def box(self) -> tuple[slice, slice]:
    return (slice(self.row, self.row + self.mask.shape[0]),
            slice(self.col, self.col + self.mask.shape[1]))


def _slice2d(image, what: str) -> np.ndarray:
  x = np.asarray(image, np.float64)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 2:
    raise ValueError(f"{what} must be one 2-D slice (H, W) in HU, got shape {x.shape}")
  return x


def sample_rois(reference_hu: np.ndarray, *, window: str | tuple[float, float], size: int = 24,
                count: int = 20, rng: np.random.Generator,
                min_fraction: float = 0.5) -> list[Roi]:
  """Up to ``count`` distinct random boxes of ``size`` x ``size`` inside the image whose
  reference pixels lie in ``window`` ((lo, hi) HU, inclusive, or a ``HU_WINDOWS`` name)
  for at least ``min_fraction`` of the box; each ROI's mask is those in-window pixels.

  "whole" gives one ROI: the whole image. Fewer than ``count`` qualifying boxes give all
  of them. Deterministic given ``rng``. Raises ``NoRoiError`` when none qualifies.
  """
  ref = _slice2d(reference_hu, "reference_hu")
  if window == "whole":
    return [Roi(0, 0, np.ones(ref.shape, bool))]
  lo, hi = HU_WINDOWS[window] if isinstance(window, str) else map(float, window)
  if not 0 < min_fraction <= 1 or int(size) != size or size < 2 or count < 1:
    raise ValueError(f"need 0 < min_fraction <= 1, size >= 2 and count >= 1; got "
                     f"min_fraction={min_fraction}, size={size}, count={count}")
  h, w = ref.shape
  if size > min(h, w):
    raise NoRoiError(f"ROI size {size} does not fit in the image of shape {ref.shape}")
  inside = (ref >= lo) & (ref <= hi)
  integral = np.pad(inside.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  s = int(size)
  sums = (integral[s:, s:] - integral[:-s, s:] - integral[s:, :-s] + integral[:-s, :-s])
  frac = sums / float(s * s)
  ok = np.flatnonzero(frac.ravel() >= min_fraction)
  if ok.size == 0:
    raise NoRoiError(
        f"no {s}x{s} box has >= {min_fraction:.0%} of its reference pixels in the HU window "
        f"[{lo:g}, {hi:g}] (the best has {frac.max():.0%}; {inside.mean():.1%} of the "
        f"image is in the window); lower min_fraction or the ROI size")
  picks = rng.choice(ok, size=min(int(count), ok.size), replace=False)
  out = []
  for p in picks:
    r, c = divmod(int(p), frac.shape[1])
    out.append(Roi(r, c, inside[r:r + s, c:c + s].copy()))
  return out


def rois_from_mask(mask: np.ndarray) -> list[Roi]:
  """One ROI per distinct non-zero label of ``mask`` (a binary mask gives one), in label
  order, each boxed to its label's bounding box."""
  m = np.asarray(mask)
  m = m[..., 0] if m.ndim == 3 and m.shape[-1] == 1 else m
  if m.ndim != 2:
    raise ValueError(f"a mask must be one 2-D slice, got shape {m.shape}")
  out = []
  for label in np.unique(m[m != 0]):
    rows, cols = np.nonzero(m == label)
    r0, c0 = int(rows.min()), int(cols.min())
    out.append(Roi(r0, c0, (m == label)[r0:rows.max() + 1, c0:cols.max() + 1]))
  return out


def roi_features(image: np.ndarray, roi: Roi, *, lo: float, hi: float, n_bins: int | None = 32,
                 bin_width: float | None = None) -> dict[str, float]:
  """``extract`` on one ROI: ID and GOH on raw HU, the other classes discretised over
  [lo, hi] (the image clipped to it); keys in ``CLASSES`` order."""
  img = _slice2d(image, "image")
  rows, cols = roi.box
  if rows.stop > img.shape[0] or cols.stop > img.shape[1]:
    raise ValueError(f"ROI box {(rows.start, cols.start, *roi.mask.shape)} leaves the "
                     f"image of shape {img.shape}")
  r0, c0 = max(rows.start - 1, 0), max(cols.start - 1, 0)  # a 1-pixel ring for GOH
  crop = img[r0:min(rows.stop + 1, img.shape[0]), c0:min(cols.stop + 1, img.shape[1])]
  mask = np.zeros(crop.shape, bool)
  mask[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0] = roi.mask
  feats = extract(crop, mask, classes=_RAW)
  feats.update(extract(np.clip(crop, lo, hi), mask, n_bins=None if bin_width else n_bins,
                       bin_width=bin_width, lo=lo, hi=hi,
                       classes=[c for c in CLASSES if c not in _RAW]))
  order = {c: i for i, c in enumerate(CLASSES)}
  return dict(sorted(feats.items(), key=lambda kv: order[kv[0].split(".", 1)[0]]))


def image_features(images: Mapping[str, np.ndarray], reference_key: str, *,
                   windows: Sequence[str] = WINDOWS, size: int = 24, count: int = 20,
                   rng: np.random.Generator, min_fraction: float = 0.5,
                   n_bins: int | None = 32, bin_width: float | None = None,
                   rois: Mapping[str, list[Roi]] | None = None,
                   ranges: Mapping[str, tuple[float, float]] = RANGES
                   ) -> dict[str, tuple[list[Roi], dict[str, list[dict[str, float]]]]]:
  """{window: (ROIs, {set: one feature dict per ROI})} for one group of paired slices.

  ROIs are sampled on ``images[reference_key]`` (or taken from ``rois[window]``) and
  applied to every set; a window without a qualifying ROI gives an empty list.
  """
  if reference_key not in images:
    raise KeyError(f"reference set {reference_key!r} is not among the sets {list(images)}")
  ref = _slice2d(images[reference_key], f"images[{reference_key!r}]")
  for name, img in images.items():
    if np.shape(_slice2d(img, f"images[{name!r}]")) != ref.shape:
      raise ValueError(f"set {name!r} has shape {np.shape(img)}, the reference {ref.shape}")
  out = {}
  for window in windows:
    if window not in ranges:
      raise KeyError(f"unknown window {window!r}; choose from {sorted(ranges)}")
    lo, hi = ranges[window]
    if rois is not None and window in rois:
      chosen = list(rois[window])
    else:
      try:
        chosen = sample_rois(ref, window=ranges[window] if window != "whole" else window,
                             size=size, count=count, rng=rng, min_fraction=min_fraction)
      except NoRoiError:
        chosen = []
    out[window] = (chosen, {name: [roi_features(img, r, lo=lo, hi=hi, n_bins=n_bins,
                                                bin_width=bin_width) for r in chosen]
                            for name, img in images.items()})
  return out


def paired_features(images: Mapping[str, Sequence[np.ndarray]], reference_key: str, *,
                    windows: Sequence[str] = WINDOWS, size: int = 24, count: int = 20,
                    rng: np.random.Generator, min_fraction: float = 0.5,
                    n_bins: int | None = 32, bin_width: float | None = None
                    ) -> dict[str, dict[str, tuple[list[str], np.ndarray]]]:
  """{window: {set: (feature names, (n_rois, n_features))}}, rows paired across sets.

  ``images`` maps a set name (A, A', B, ...) to its slices in HU, the i-th slices of all
  sets being one paired group; ROIs come from the ``reference_key`` set (see
  ``image_features``). Raises ``NoRoiError`` when a window has no ROI in any image.
  """
  lengths = {name: len(v) for name, v in images.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"every set needs the same number of paired slices, got {lengths}")
  rows = {w: {name: [] for name in images} for w in windows}
  for i in range(next(iter(lengths.values()))):
    got = image_features({k: v[i] for k, v in images.items()}, reference_key,
                         windows=windows, size=size, count=count, rng=rng,
                         min_fraction=min_fraction, n_bins=n_bins, bin_width=bin_width)
    for w, (_, feats) in got.items():
      for name, f in feats.items():
        rows[w][name] += f
  empty = [w for w in windows if not rows[w][reference_key]]
  if empty:
    raise NoRoiError(f"no ROI of size {size} qualifies in any image for window(s) {empty}")
  return {w: {name: stack(r) for name, r in sets.items()} for w, sets in rows.items()}


def paired_ccc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Lin's CCC per feature column; ROIs where a feature is non-finite in x or y are left
  out of that feature, and a feature with < 2 ROIs left or 0/0 is NaN."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  out = np.full(x.shape[1], np.nan)
  finite = np.isfinite(x) & np.isfinite(y)
  for j in range(x.shape[1]):
    keep = finite[:, j]
    if keep.sum() >= 2:
      out[j] = concordance.ccc(x[keep, j], y[keep, j], on_constant="ignore")
  return out
