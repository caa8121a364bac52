"""Pillow-based decoding and resizing shared by the readers, transforms and TFDS."""
from __future__ import annotations

import io
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from medrep_jax.data.sources import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")

PathOrBytes = str | os.PathLike | bytes


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Sorted image files (by extension, case-insensitive) directly in `folder`."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)


def _describe(src: PathOrBytes) -> str:
  return f"<{len(src)} encoded bytes>" if isinstance(src, bytes) else str(src)


def _open(src: PathOrBytes) -> Image.Image:
  return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
  """8-bit as is; 16-bit integer data is scaled by 1/257; float in [0,1] by 255."""
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == bool:
    return arr.astype(np.uint8) * 255
  if np.issubdtype(arr.dtype, np.floating):
    scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
    return np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
  if arr.size and int(arr.max()) > 255:
    return np.clip(np.round(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
  return np.clip(arr, 0, 255).astype(np.uint8)


def native_channels(src: PathOrBytes) -> int:
  """Channels of an image as stored (1 for grey modes, else 3); header only."""
  try:
    with _open(src) as im:
      return 1 if im.mode in _GREY_MODES else 3
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read image header of {_describe(src)}: {e}") from e


def probe_channels(paths: Sequence[pathlib.Path]) -> int:
  """Native channels of the first readable file in `paths` (3 if none)."""
  for p in paths:
    try:
      return native_channels(p)
    except DataError as e:
      logging.warning("%s", e)
  return 3


def decode_image(src: PathOrBytes, channels: int | None = None) -> np.ndarray:
  """Decodes an image file or encoded bytes to (H, W, C) uint8.

  Args:
    src: a path, or encoded bytes (PNG, JPEG, ...).
    channels: None keeps the stored channels (grey -> 1, otherwise RGB -> 3);
      1 converts to luma (ITU-R 601-2), 3 to RGB.

  Raises:
    DataError: naming the file when it cannot be decoded.
  """
  if channels not in (None, 1, 3):
    raise DataError(f"channels must be None, 1 or 3, got {channels!r}")
  try:
    with _open(src) as im:
      im.load()
      if im.mode in ("1", "L", "RGB"):
        arr = np.asarray(im.convert("L") if im.mode == "1" else im)
      elif im.mode in _GREY_MODES:
        arr = _to_uint8(np.asarray(im.convert("L") if im.mode == "LA" else im))
      else:
        arr = np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"cannot decode image {_describe(src)}: {e}. Replace or delete the file, "
        "or set data.skip_corrupt=True to skip unreadable files") from e
  if arr.ndim == 2:
    arr = arr[..., None]
  return convert_channels(arr, channels)


def convert_channels(arr: np.ndarray, channels: int | None) -> np.ndarray:
  """(H, W, C) grey <-> RGB; RGB to grey uses ITU-R 601-2 luma weights."""
  c = arr.shape[-1]
  if channels is None or channels == c:
    return arr
  if c == 1 and channels == 3:
    return np.repeat(arr, 3, axis=-1)
  if c == 3 and channels == 1:
    grey = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.dtype == np.uint8:
      grey = np.clip(np.round(grey), 0, 255)
    return grey.astype(arr.dtype)[..., None]
  raise DataError(f"cannot convert an image of shape {arr.shape} to {channels} channels")


def decode_mask(src: PathOrBytes, *, grey: bool) -> np.ndarray:
  """Decodes a mask to (H, W) uint8.

  Args:
    src: a path or encoded bytes.
    grey: True converts to luma first (for thresholding 0/255 masks, RGB JPEG
      masks, palette masks); False keeps stored values (palette indices).
  """
  try:
    with _open(src) as im:
      im.load()
      if grey or im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        im = im.convert("L")
      arr = np.asarray(im)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"cannot decode mask {_describe(src)}: {e}. Replace or delete the file, "
        "or set data.skip_corrupt=True") from e
  if arr.dtype != np.uint8:
    if arr.size and int(arr.max()) > 255:
      raise DataError(f"mask {_describe(src)} has values up to {int(arr.max())}; "
                      "class-id masks must fit in uint8")
    arr = arr.astype(np.uint8)
  return arr


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of (H, W, C) uint8 or float32."""
  if image.shape[:2] == hw:
    return image
  size = (hw[1], hw[0])
  if image.dtype == np.uint8 and image.shape[-1] in (1, 3):
    mode = "L" if image.shape[-1] == 1 else "RGB"
    out = np.asarray(Image.fromarray(image[..., 0] if mode == "L" else image, mode)
                     .resize(size, Image.BILINEAR))
    return out[..., None] if mode == "L" else out
  chans = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), "F")
                      .resize(size, Image.BILINEAR)) for c in range(image.shape[-1])]
  out = np.stack(chans, -1)
  if image.dtype == np.uint8:
    out = np.clip(np.round(out), 0, 255)
  return out.astype(image.dtype)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of an (H, W) uint8 mask (values stay in the set)."""
  if mask.shape[:2] == tuple(hw):
    return mask
  return np.asarray(Image.fromarray(mask).resize((hw[1], hw[0]), Image.NEAREST))


def encode_png(arr: np.ndarray) -> bytes:
  """Encodes (H, W), (H, W, 1) or (H, W, 3) uint8 as PNG bytes (lossless)."""
  if arr.dtype != np.uint8:
    raise DataError(f"PNG encoding needs uint8, got {arr.dtype} of shape {arr.shape}")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()
