"""Mask values -> class ids, and several masks per image -> one target.

Value mapping (`MaskValues`), applied to each stored mask before combining:
  * `threshold` (default 127, on the 0-255 scale): id 1 where value > threshold.
    Float masks in [0, 1] are scaled by 255 first (so 127 binarizes at 0.5),
    16-bit masks divided by 257; integer masks holding only 0 and 1 are
    already binary and are kept as they are.
  * `values` (threshold off): nearest stored value -> its index, e.g.
    (0, 128, 255) -> ids 0, 1, 2 (a label lookup).
  * neither: stored values are the ids (they must be < `num_classes`).
  * `invert` (binary masks only): id 1 where the stored mask is background,
    e.g. membranes stored as 0 in ISBI 2012.

Combining several masks of one image (`combine`):
  * "union": a pixel's id is the largest id any mask gives it (for binary
    masks: foreground in any mask), e.g. BUSI's second lesion masks;
  * "majority": binary masks only: foreground where more than half agree
    (ties are background), e.g. several raters;
  * "first": the first mask in sorted file-name order;
  * "stack": every mask kept, (K, H, W) under "masks", and "mask" is their union.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from medrep_jax.data.sources import DataError

COMBINE = ("union", "majority", "first", "stack")


def to_uint8_scale(raw: np.ndarray) -> np.ndarray:
  """A stored mask on the 0-255 scale (float32), for thresholding."""
  if raw.dtype == bool:
    return raw.astype(np.float32) * 255
  if np.issubdtype(raw.dtype, np.floating):
    top = float(np.nanmax(raw)) if raw.size else 0.0
    return raw.astype(np.float32) * (255.0 if top <= 1.0 else 1.0)
  if raw.size and int(raw.max()) > 255:
    return raw.astype(np.float32) / 257.0
  return raw.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MaskValues:
  """Stored mask values -> uint8 class ids (see the module docstring)."""
  threshold: float | None = 127
  values: tuple[float, ...] = ()
  num_classes: int = 0
  invert: bool = False

  def __post_init__(self):
    if self.invert and self.threshold is None and len(self.values) != 2:
      raise DataError("data.mask_invert needs binary masks: a data.mask_threshold >= 0, or "
                      "two data.mask_values")

  @property
  def num_ids(self) -> int:
    """Number of ids the mapping gives (0 if only the data can tell)."""
    if self.threshold is not None:
      return 2
    if self.values:
      return len(self.values)
    return int(self.num_classes)

  def __call__(self, raw: np.ndarray, where: str) -> np.ndarray:
    raw = np.asarray(raw)
    if self.threshold is not None:
      if np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool:
        if not raw.size or (int(raw.min()) >= 0 and int(raw.max()) <= 1):
          mask = raw.astype(np.uint8)
          return 1 - mask if self.invert else mask
      mask = (to_uint8_scale(raw) > float(self.threshold)).astype(np.uint8)
    elif self.values:
      v = np.asarray(self.values, np.float64)
      mask = np.abs(raw.astype(np.float64)[..., None] - v).argmin(-1).astype(np.uint8)
    else:
      ids = np.rint(raw.astype(np.float64)) if np.issubdtype(raw.dtype, np.floating) else raw
      top = int(ids.max()) if ids.size else 0
      if ids.size and int(ids.min()) < 0:
        raise DataError(f"mask {where} has negative id {int(ids.min())}; set "
                        "data.mask_threshold or data.mask_values")
      if self.num_classes and top >= self.num_classes:
        raise DataError(f"mask {where} has id {top}, outside [0, num_mask_classes="
                        f"{self.num_classes}); set data.num_mask_classes, data.mask_values or "
                        "data.mask_threshold")
      if top > 255:
        raise DataError(f"mask {where} has values up to {top}; class-id masks must fit in "
                        "uint8 (set data.mask_threshold or data.mask_values)")
      mask = ids.astype(np.uint8)
    if self.invert:
      mask = (mask == 0).astype(np.uint8)
    return mask


def combine(masks: Sequence[np.ndarray], rule: str, where: str) -> dict[str, np.ndarray]:
  """Several id masks of one image -> {"mask": (H, W)} (+ "masks" (K, H, W) for "stack")."""
  if rule not in COMBINE:
    raise DataError(f"data.mask_combine={rule!r}; expected one of {COMBINE}")
  shapes = {m.shape for m in masks}
  if len(shapes) != 1:
    raise DataError(f"the masks of {where} have different shapes {sorted(shapes)}; fix or "
                    "remove them, or choose one with data.mask_choose")
  if rule == "first" or len(masks) == 1 and rule != "stack":
    return {"mask": masks[0]}
  stack = np.stack(masks)
  union = stack.max(0)
  if rule == "union":
    return {"mask": union}
  if rule == "stack":
    return {"mask": union, "masks": stack}
  if int(stack.max()) > 1:
    raise DataError(f"data.mask_combine='majority' needs binary masks, but a mask of {where} "
                    f"has id {int(stack.max())}; use 'union' or 'first'")
  return {"mask": ((stack > 0).sum(0) * 2 > len(masks)).astype(np.uint8)}
