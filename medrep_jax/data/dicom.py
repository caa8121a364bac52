"""DICOM reader: CT slices in Hounsfield units (HU)."""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pydicom
import pydicom.errors

from medrep_jax.data.readers import resolve_split
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, carve_by_group

PathLike = str | os.PathLike


def _without_force_hint(e: Exception) -> str:
  """pydicom's message without its "Use force=True" advice, which users cannot act on."""
  return re.sub(r"\s*Use force=True[^.]*\.?", "", str(e)).strip() or type(e).__name__


def to_hu(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
  """Stored values -> HU: pixels * RescaleSlope + RescaleIntercept (defaults 1, 0)."""
  slope = float(ds.get("RescaleSlope", 1) or 1)
  intercept = float(ds.get("RescaleIntercept", 0) or 0)
  return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def apply_window(hu: np.ndarray, window: tuple[float, float] | None, output: str) -> np.ndarray:
  """Clips to [level - width/2, level + width/2]; "unit" output rescales to [0, 1]."""
  if window is None:
    return hu
  level, width = float(window[0]), float(window[1])
  lo, hi = level - width / 2, level + width / 2
  hu = np.clip(hu, lo, hi)
  return (hu - lo) / np.float32(hi - lo) if output == "unit" else hu


class DicomFolder(Source):
  """All `*.dcm` files under a folder (recursive, sorted) as float32 (H, W, 1).

  Values are HU (or windowed HU, or [0, 1] with `output="unit"`, which needs a
  `window=(level, width)`). Multi-frame files: `frames="first"` (default)
  reads the first frame; `frames="all"` makes every frame its own element
  (reads every header at construction). Splits carved from one folder keep
  whole groups together: a group is the first `group_depth` path components
  below the base folder (default 1: the patient folder), so no patient is in
  two splits; `group_depth=0` splits per file.
  """

  def __init__(self, root: PathLike, split: str = "train", *,
               window: tuple[float, float] | None = None, output: str = "hu",
               frames: str = "first", group_depth: int = 1, val_fraction: float = 0.1,
               test_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False,
               name: str | None = None):
    if output not in ("hu", "unit"):
      raise DataError(f"output must be 'hu' or 'unit', got {output!r}")
    if output == "unit" and window is None:
      raise DataError("output='unit' needs window=(level, width) in HU, e.g. (-600, 1500)")
    if window is not None and (len(window) != 2 or float(window[1]) <= 0):
      raise DataError(f"window must be (level, width) with width > 0, got {window!r}")
    if frames not in ("first", "all"):
      raise DataError(f"frames must be 'first' or 'all', got {frames!r}")
    root = pathlib.Path(root)
    base, carve, vf, tf = resolve_split(root, split, val_fraction, test_fraction)
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
    groups = [p.relative_to(base).parts[:group_depth] if len(p.relative_to(base).parts) > 1
              else p.name for p in files]
    files = [files[i] for i in carve_by_group(groups, carve, val_fraction=vf,
                                              test_fraction=tf, seed=seed)]
    if not files:
      raise DataError(f"no .dcm files for split {split!r} under {base}. Expected layout:\n"
                      f"  {root}/<patient>/.../*.dcm  (or {root}/{{train,val,test}}/...)")
    self.skip_corrupt = skip_corrupt
    self.elements = [(p, 0) for p in files] if frames == "first" else self._frames(files)
    self.window = None if window is None else (float(window[0]), float(window[1]))
    self.output = output
    self.info = SourceInfo(name=name or root.name, num_classes=0, class_names=(), channels=1,
                           image_dtype="float32")

  def _frames(self, files: list[pathlib.Path]) -> list[tuple[pathlib.Path, int]]:
    out = []
    for p in files:
      try:
        n = int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
      except Exception:  # pylint: disable=broad-except
        n = 1  # reported (or skipped) when the element is read
      out += [(p, f) for f in range(n)]
    return out

  def _num_elements(self) -> int:
    return len(self.elements)

  def _load(self, index: int) -> Record:
    path, frame = self.elements[index]
    try:
      ds = pydicom.dcmread(path)
      pixels = ds.pixel_array
    except pydicom.errors.InvalidDicomError as e:
      raise DataError(f"{path} is not a DICOM file (no DICOM header: the 'DICM' marker at "
                      "byte 128 is missing). Remove it from the data folder, or set "
                      "data.skip_corrupt=True to skip unreadable files") from e
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"cannot read DICOM {path}: {_without_force_hint(e)}. Replace or "
                      "delete the file, or set data.skip_corrupt=True to skip it") from e
    if int(ds.get("SamplesPerPixel", 1)) != 1:
      raise DataError(f"DICOM {path} has {ds.SamplesPerPixel} samples per pixel; "
                      "only greyscale (CT/MR/X-ray) is supported")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
      pixels = pixels[frame]
    if pixels.ndim != 2:
      raise DataError(f"DICOM {path} frame {frame} has pixel shape {pixels.shape}; expected 2-D")
    image = apply_window(to_hu(ds, pixels), self.window, self.output)
    return {"image": image.astype(np.float32)[..., None]}
