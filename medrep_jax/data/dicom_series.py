"""DICOM series: the slice files of one folder as a volume in Hounsfield units (HU).

`read_header` reads what ordering needs (no pixels); `group_series` splits a folder's
slices by SeriesInstanceUID; `read_series` orders one series' slices and stacks them:

  * order: by the slice position along the slice normal (ImagePositionPatient projected
    on the cross product of the ImageOrientationPatient row and column directions) when
    every slice has both tags, else by InstanceNumber when every slice has one, else by
    file name; ties are broken by InstanceNumber, then file name;
  * values: HU per slice (stored value * RescaleSlope + RescaleIntercept,
    `dicom_io.read_dicom`), so slices with different rescale tags stack correctly;
  * a multi-frame file is a series of its own: its frames in stored order;
  * spacing: (the median distance between adjacent slice positions, else SliceThickness,
    else 1; then PixelSpacing row and column, else 1), in the array's axis order.

Every error is a `DataError` naming the file: not DICOM, unreadable, colour, or a slice
whose shape differs from the series' first slice.
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Sequence

import numpy as np
import pydicom

from medrep_jax.data import dicom_io
from medrep_jax.data.formats import Volume
from medrep_jax.data.sources import DataError

SUFFIX = ".dcm"


@dataclasses.dataclass(frozen=True)
class SliceHeader:
  """What ordering and checking one DICOM file needs (read without its pixels)."""
  path: pathlib.Path
  series: str                  # SeriesInstanceUID ("" when the file has none)
  position: float | None       # along the slice normal (mm); None without the tags
  instance: int | None         # InstanceNumber
  frames: int                  # NumberOfFrames (1 for a plain slice)
  shape: tuple[int, int]       # (Rows, Columns)
  thickness: float | None
  pixel_spacing: tuple[float, float] | None


def _floats(value, n: int) -> list[float] | None:
  try:
    out = [float(v) for v in value]
  except (TypeError, ValueError):
    return None
  return out if len(out) == n else None


def read_header(path: pathlib.Path) -> SliceHeader:
  """The header of one DICOM file; DataError naming the file when it is not readable."""
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    shape = (int(ds.Rows), int(ds.Columns))
  except Exception as e:  # pylint: disable=broad-except  # pydicom raises many kinds
    raise DataError(f"cannot read the DICOM header of {path} (not DICOM, damaged or "
                    f"truncated?): {type(e).__name__}: {e}. Remove it from the series, or "
                    "set data.skip_corrupt=True to skip the case") from e
  orientation = _floats(ds.get("ImageOrientationPatient"), 6)
  origin = _floats(ds.get("ImagePositionPatient"), 3)
  position = None
  if orientation is not None and origin is not None:
    normal = np.cross(orientation[:3], orientation[3:])
    position = float(np.dot(normal, origin))
  instance = ds.get("InstanceNumber")
  spacing = _floats(ds.get("PixelSpacing"), 2)
  thickness = ds.get("SliceThickness")
  return SliceHeader(
      path=pathlib.Path(path), series=str(ds.get("SeriesInstanceUID", "") or ""),
      position=position, instance=None if instance in (None, "") else int(instance),
      frames=int(ds.get("NumberOfFrames", 1) or 1), shape=shape,
      thickness=float(thickness) if thickness not in (None, "") else None,
      pixel_spacing=tuple(spacing) if spacing else None)


def group_series(headers: Sequence[SliceHeader]) -> dict[str, list[SliceHeader]]:
  """SeriesInstanceUID -> its slices, in sorted UID order."""
  out: dict[str, list[SliceHeader]] = collections.defaultdict(list)
  for h in headers:
    out[h.series].append(h)
  return dict(sorted(out.items()))


def order_slices(headers: Sequence[SliceHeader]) -> list[SliceHeader]:
  """Slices in volume order (the rule of the module docstring)."""
  def tie(h: SliceHeader):
    return (h.instance if h.instance is not None else 0, h.path.name)
  if all(h.position is not None for h in headers):
    return sorted(headers, key=lambda h: (h.position, *tie(h)))
  if all(h.instance is not None for h in headers):
    return sorted(headers, key=tie)
  return sorted(headers, key=lambda h: h.path.name)


def _spacing(ordered: Sequence[SliceHeader]) -> tuple[float, float, float]:
  first = ordered[0]
  gaps = np.abs(np.diff([h.position for h in ordered if h.position is not None]))
  gaps = gaps[gaps > 0]
  depth = float(np.median(gaps)) if gaps.size else (first.thickness or 1.0)
  rows, cols = first.pixel_spacing or (1.0, 1.0)
  return depth, float(rows), float(cols)


def _frames(header: SliceHeader) -> np.ndarray:
  """(F, H, W) HU of one file (F = 1 for a plain slice)."""
  if header.frames <= 1:
    return dicom_io.read_dicom(header.path)[None, ..., 0]
  dicom_io.read_dicom(header.path)  # checks the file (errors name it)
  ds = pydicom.dcmread(header.path)
  return dicom_io.to_hu(ds, np.asarray(ds.pixel_array).reshape((header.frames,) + header.shape))


def read_series(headers: Sequence[SliceHeader], where: str | pathlib.Path) -> Volume:
  """One series as a float32 HU `Volume` (Z, Y, X) in slice order.

  Args:
    headers: the series' slices (`read_header`), any order.
    where: the case (folder) named in errors.

  Raises:
    DataError: naming the file whose slice shape differs from the first slice's, or a
      file that cannot be decoded.
  """
  if not headers:
    raise DataError(f"{where} holds no DICOM slices")
  ordered = order_slices(headers)
  first = ordered[0]
  for h in ordered[1:]:
    if h.shape != first.shape:
      raise DataError(f"DICOM series in {where}: slice {h.path} is {h.shape[0]}x{h.shape[1]} "
                      f"but {first.path} is {first.shape[0]}x{first.shape[1]}; a volume needs "
                      "slices of one shape. Remove the odd file (a scout or a reformat), or "
                      "set data.skip_corrupt=True to skip the case")
  if len(ordered) > 1 and any(h.frames > 1 for h in ordered):
    odd = next(h for h in ordered if h.frames > 1)
    raise DataError(f"DICOM series in {where}: {odd.path} is a multi-frame file ({odd.frames} "
                    "frames) among other slices; keep a multi-frame volume in a folder of its "
                    "own")
  array = np.concatenate([_frames(h) for h in ordered]).astype(np.float32)
  return Volume(array=array, spacing=_spacing(ordered), path=str(where))
