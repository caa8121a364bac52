"""Decoding one DICOM file (or frame) to Hounsfield units (HU), with an optional window."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pydicom
import pydicom.errors

from medrep_jax.data.sources import DataError


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


def read_dicom(path: pathlib.Path, frame: int = 0,
               window: tuple[float, float] | None = None, output: str = "hu") -> np.ndarray:
  """One DICOM frame as float32 (H, W, 1): HU, windowed HU, or [0, 1] with "unit".

  Raises:
    DataError: naming the file when it is not DICOM, cannot be decoded, is colour or
      is not 2-D.
  """
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
  image = apply_window(to_hu(ds, pixels), window, output)
  return image.astype(np.float32)[..., None]
