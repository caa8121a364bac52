"""Reading one file of any supported format, volumes and their slices, and scaling to [0, 1].

Formats (`SUPPORTED`):
  - images through Pillow: .png .jpg .jpeg .tif .tiff .gif .bmp (the first page of a
    multi-page TIFF);
  - NumPy arrays: .npy, and .npz (one named array, or the only one);
  - volumes: NIfTI .nii/.nii.gz (nibabel: pure Python, MIT licence) and MetaImage
    .mha/.mhd (+ .raw/.zraw) through the small parser in `metaimage.py` (SimpleITK would
    be a ~50 MB binary wheel for one simple format).

Axis convention. `read_array` returns what the file stores, in its stored dtype and range:
  - a 2-D image as (H, W) when grey and (H, W, 3) when colour;
  - an .npy/.npz array with the axes it was saved with;
  - a volume with the slice axis first: (Z, Y, X), plus trailing axes for channels or
    time. NIfTI stores voxels as [x, y, z], so they are transposed to (z, y, x); NIfTI
    scaling (scl_slope, scl_inter) is applied, so CT comes back in HU. Voxels keep the
    stored order (no reorientation to RAS). MetaImage is already stored z-slowest.
`read_volume` also gives the voxel spacing, in the array's axis order.

`to_image` maps any array to float32 in [0, 1]: with a (level, width) window exactly as
the DICOM reader does (`apply_window`), else by the dtype rule in its docstring.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile

import numpy as np

from medrep_jax.data import imageio, metaimage
from medrep_jax.data.sources import DataError

PathLike = str | os.PathLike

IMAGE_SUFFIXES = imageio.IMAGE_EXTS
ARRAY_SUFFIXES = (".npy", ".npz")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd")
SUPPORTED = IMAGE_SUFFIXES + ARRAY_SUFFIXES + VOLUME_SUFFIXES
VALUE_RANGES = ("auto", "dtype", "minmax", "unit")


def suffix_of(path: PathLike) -> str:
  """The lower-case format suffix of `path`; `.nii.gz` counts as one suffix."""
  name = pathlib.Path(path).name.lower()
  if name.endswith(".nii.gz"):
    return ".nii.gz"
  return pathlib.Path(name).suffix


def stem_of(path: PathLike) -> str:
  """The file name without its format suffix (`a.nii.gz` -> `a`)."""
  name = pathlib.Path(path).name
  return name[:len(name) - len(suffix_of(name))] if suffix_of(name) else name


def is_supported(path: PathLike) -> bool:
  """Whether `read_array` reads files with this suffix (case-insensitive)."""
  return suffix_of(path) in SUPPORTED


def is_volume(path: PathLike) -> bool:
  """Whether the suffix is a volume format (NIfTI, MetaImage). An .npy may hold a volume
  too; only its shape tells."""
  return suffix_of(path) in VOLUME_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Volume:
  """A volume read from a file.

  Attributes:
    array: voxels, slice axis first: (Z, Y, X) (plus trailing channel/time axes), or
      (Y, X) for a 2-D file.
    spacing: voxel size along each spatial axis of `array`, in its order (mm for medical
      formats; 1.0 where the file stores none).
    path: the file it came from.
  """
  array: np.ndarray
  spacing: tuple[float, ...]
  path: str


# ---------------------------------------------------------------- readers


def _read_pillow(path: pathlib.Path) -> np.ndarray:
  """8-bit images through `imageio.decode_image`; 16/32-bit and float ones as stored."""
  native = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
  try:
    with imageio._open(path) as im:  # pylint: disable=protected-access
      if im.mode in native:
        im.load()
        arr = np.asarray(im)
        return arr.astype(arr.dtype.newbyteorder("="))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot decode image {path}: {e}. Replace or delete the file, or set "
                    "data.skip_corrupt=True to skip unreadable files") from e
  arr = imageio.decode_image(path)
  return arr[..., 0] if arr.shape[-1] == 1 else arr


def _load_error(where: str, e: Exception) -> DataError:
  """The error of a failed np.load of `where` (a file, or a file and its array)."""
  if "allow_pickle" in str(e):
    return DataError(f"{where} holds Python objects (dtype=object), which medrep_jax does "
                     "not load because unpickling can run code; save a numeric array instead")
  return DataError(f"cannot read {where} (damaged or truncated?): {e}")


def _read_npy(path: pathlib.Path) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise _load_error(f"{path}", e) from e


def _read_npz(path: pathlib.Path, key: str | None) -> np.ndarray:
  try:
    with np.load(path, allow_pickle=False) as npz:
      keys = sorted(npz.files)
      if key is None:
        if len(keys) != 1:
          raise DataError(f"{path} holds {len(keys)} arrays {keys}; say which one to read "
                          "(data.array_key)")
        key = keys[0]
      if key not in keys:
        raise DataError(f"{path} has no array {key!r}; keys present: {keys} "
                        "(data.array_key)")
      return np.asarray(npz[key])
  except DataError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise _load_error(f"{path}: array {key!r}", e) from e


def _read_nifti(path: pathlib.Path) -> tuple[np.ndarray, tuple[float, ...]]:
  import nibabel as nib  # pylint: disable=g-import-not-at-top  # only when NIfTI is read
  try:
    img = nib.load(path)
    arr = np.asarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms())
  except Exception as e:  # pylint: disable=broad-except  # nibabel raises many kinds
    raise DataError(f"cannot read NIfTI {path} (damaged or truncated?): "
                    f"{' '.join(str(e).split()) or type(e).__name__}") from e
  spatial = min(arr.ndim, 3)
  order = tuple(reversed(range(spatial))) + tuple(range(spatial, arr.ndim))
  spacing = tuple(reversed(zooms[:spatial])) if len(zooms) >= spatial else (1.0,) * spatial
  return np.ascontiguousarray(arr.transpose(order)), spacing


def read_volume(path: PathLike, *, key: str | None = None) -> Volume:
  """Reads a NIfTI or MetaImage volume (or an .npy/.npz array, spacing 1) with its spacing.

  `key` names the array of an .npz (default: its only array).

  Raises:
    DataError: naming the file when it cannot be read, or when it is a 2-D image format.
  """
  path = pathlib.Path(path)
  kind = suffix_of(path)
  if kind in (".nii", ".nii.gz"):
    arr, spacing = _read_nifti(path)
  elif kind in (".mha", ".mhd"):
    arr, spacing = metaimage.read_metaimage(path)
  elif kind in ARRAY_SUFFIXES:
    arr = read_array(path, key=key)
    spacing = (1.0,) * min(arr.ndim, 3)
  else:
    raise DataError(f"{path} is not a volume file; volume formats: "
                    f"{', '.join(VOLUME_SUFFIXES + ARRAY_SUFFIXES)}")
  return Volume(array=arr, spacing=spacing, path=str(path))


def read_array(path: PathLike, *, key: str | None = None) -> np.ndarray:
  """Reads one file in its stored dtype and range (axis convention: module docstring).

  Args:
    path: a file with a suffix in `SUPPORTED`.
    key: the array to read from an .npz (default: its only array).

  Raises:
    DataError: naming the file (and key) when it is missing, damaged, truncated, holds
      Python objects, or has an unsupported suffix.
  """
  path = pathlib.Path(path)
  kind = suffix_of(path)
  if kind not in SUPPORTED:
    raise DataError(f"{path}: unsupported file type {kind or '(no suffix)'!r}; supported: "
                    f"{', '.join(SUPPORTED)}")
  if not path.is_file():
    raise DataError(f"{path} does not exist or is not a file")
  if kind in IMAGE_SUFFIXES:
    return _read_pillow(path)
  if kind == ".npy":
    return _read_npy(path)
  if kind == ".npz":
    return _read_npz(path, key)
  return read_volume(path).array


# ---------------------------------------------------------------- slices


def _spatial_axis(volume: np.ndarray, axis: int) -> int:
  nd = min(volume.ndim, 3)
  if volume.ndim < 3 or not -nd <= axis < nd:
    raise DataError(f"cannot slice an array of shape {volume.shape} along axis {axis}; a "
                    "volume is (Z, Y, X[, C]) and the slice axis is 0, 1 or 2 "
                    "(data.slice_axis)")
  return axis % nd


def volume_slices(volume: np.ndarray, *, axis: int = 0, stride: int = 1,
                  mask: np.ndarray | None = None, only_foreground: bool = False) -> list[int]:
  """The indices of the 2-D slices to take from a volume.

  Args:
    volume: (Z, Y, X) or (Z, Y, X, C).
    axis: the spatial axis to slice along (0 = axial for (Z, Y, X)).
    stride: keep every `stride`-th slice. With `only_foreground`, the stride runs over
      the foreground slices (so about n_foreground / stride are kept).
    mask: a label volume of the same spatial shape (needed by `only_foreground`).
    only_foreground: keep only slices where `mask` has a nonzero voxel.

  Raises:
    DataError: for a bad axis or stride, or a mask whose shape does not fit.
  """
  axis = _spatial_axis(volume, axis)
  if int(stride) < 1:
    raise DataError(f"the slice stride must be >= 1, got {stride} (data.slice_stride)")
  indices = list(range(volume.shape[axis]))
  if only_foreground:
    if mask is None:
      raise DataError("only_foreground needs the mask volume (data.only_foreground)")
    mask = np.asarray(mask)
    if mask.shape[:3] != volume.shape[:3]:
      raise DataError(f"mask volume of shape {mask.shape} does not fit the image volume of "
                      f"shape {volume.shape}")
    other = tuple(a for a in range(mask.ndim) if a != axis)
    fg = np.any(mask != 0, axis=other)
    indices = [i for i in indices if fg[i]]
  return indices[::int(stride)]


def take_slice(volume: np.ndarray, index: int, axis: int = 0) -> np.ndarray:
  """Slice `index` along spatial `axis`: (H, W), or (H, W, C) for a (Z, Y, X, C) volume."""
  axis = _spatial_axis(volume, axis)
  if not -volume.shape[axis] <= index < volume.shape[axis]:
    raise DataError(f"slice {index} is out of range for axis {axis} of a volume of shape "
                    f"{volume.shape}")
  return np.ascontiguousarray(np.take(volume, index, axis=axis))


# ---------------------------------------------------------------- values -> [0, 1]


def check_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
  """`window` as floats, or a DataError unless it is None or (level, width > 0)."""
  if window is None:
    return None
  if len(window) != 2 or not float(window[1]) > 0:
    raise DataError(f"a window is (level, width) with width > 0, got {window!r} "
                    "(data.window_level, data.window_width)")
  return float(window[0]), float(window[1])


def apply_window(values: np.ndarray, window: tuple[float, float] | None,
                 output: str) -> np.ndarray:
  """Clips to [level - width/2, level + width/2]; "unit" output rescales to [0, 1].

  The window/level rule of the DICOM reader (the same arithmetic as
  `dicom.apply_window`), for any array: HU, float, or integer (as float32).
  """
  if window is None:
    return values
  level, width = float(window[0]), float(window[1])
  lo, hi = level - width / 2, level + width / 2
  values = np.clip(np.asarray(values, np.float32), lo, hi)
  return (values - lo) / np.float32(hi - lo) if output == "unit" else values


def _minmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float32)
  if not x.size:
    return x
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / np.float32(hi - lo) if hi > lo else np.zeros_like(x)


def to_image(arr: np.ndarray, *, window: tuple[float, float] | None = None,
             value_range: str = "auto", where: str = "") -> np.ndarray:
  """Scales an image (or slice) to float32 in [0, 1].

  With a `window` (level, width), values are clipped to the window and mapped linearly
  to [0, 1] (`apply_window(..., "unit")`, as the DICOM reader does with
  `dicom_output="unit"`). Without one, `value_range` chooses:
    - "auto": bool -> {0, 1}; uint8 -> / 255; other integers (uint16, int16, ...)
      -> min-max per image, because 16-bit medical images rarely use the full range
      (12-bit detectors) and signed integers are mostly HU, for which a window is the
      right tool; floats already in [0, 1] stay; other floats -> min-max per image.
    - "dtype": unsigned integers / their dtype's maximum; others as "auto".
    - "minmax": min-max per image for every dtype (a constant image gives zeros).
    - "unit": the values are taken to be in [0, 1] already and clipped to it.

  Args:
    arr: any shape and numeric dtype.
    window: (level, width), or None.
    value_range: "auto", "dtype", "minmax" or "unit".
    where: the file the array came from, named in errors.

  Raises:
    DataError: for NaN/Inf values, a bad window or an unknown value_range.
  """
  arr = np.asarray(arr)
  name = f" in {where}" if where else ""
  if value_range not in VALUE_RANGES:
    raise DataError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r} "
                    "(data.value_range)")
  if arr.dtype.kind not in "biuf":
    raise DataError(f"cannot scale an array of dtype {arr.dtype}{name} to an image")
  if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
    raise DataError(f"the image{name} (shape {arr.shape}) holds NaN or Inf values; fix the "
                    "file or remove it")
  window = check_window(window)
  if window is not None:
    return apply_window(arr, window, "unit").astype(np.float32)
  if arr.dtype == bool:
    return arr.astype(np.float32)
  if value_range == "minmax":
    return _minmax(arr)
  if value_range == "unit":
    return np.clip(arr.astype(np.float32), 0, 1)
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / np.float32(255)
  if arr.dtype.kind == "u" and value_range == "dtype":
    return (arr.astype(np.float64) / np.iinfo(arr.dtype).max).astype(np.float32)
  if arr.dtype.kind == "f" and (not arr.size or (arr.min() >= 0 and arr.max() <= 1)):
    return arr.astype(np.float32)
  return _minmax(arr)


def to_hwc(arr: np.ndarray, *, where: str = "") -> np.ndarray:
  """A 2-D image as (H, W, C): (H, W) -> (H, W, 1); (H, W, C) with C <= 4 as is."""
  arr = np.asarray(arr)
  if arr.ndim == 2:
    return arr[..., None]
  if arr.ndim == 3 and arr.shape[-1] <= 4:
    return arr
  name = f"{where}: " if where else ""
  raise DataError(f"{name}an array of shape {arr.shape} is not a 2-D image (H, W) or "
                  "(H, W, C) with C <= 4; a volume needs slicing (data.slice_axis)")
