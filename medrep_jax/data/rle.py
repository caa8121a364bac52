"""Run-length encoded (RLE) masks: decoding and encoding.

A text holds pairs "start length" separated by white space; each pair marks a run of
`length` foreground pixels of the flattened image. Two conventions:

  * relative (SIIM-ACR pneumothorax, `relative=True`): each start is an offset, 0-based,
    from the end of the previous run (the first from pixel 0);
  * absolute (Kaggle's usual, `relative=False`): each start is the 1-based index of the
    run's first pixel.

Pixels are numbered column-major (`order="F"`: the image transposed, index = x * H + y,
as in SIIM and most Kaggle sets) or row-major (`order="C"`: index = y * W + x). An empty
mask is written "-1" (SIIM) or "" (Kaggle); both decode to zeros. Several texts of one
image (one row per region, as in SIIM) are OR-ed by `decode_rles`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from medrep_jax.data.sources import DataError

ORDERS = ("F", "C")
EMPTY = ("", "-1")
_SHOWN = 60  # characters of an RLE text quoted in errors


def _short(text: str) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def _check_layout(shape: Sequence[int], order: str) -> tuple[tuple[int, ...], int]:
  if order not in ORDERS:
    raise DataError(f"RLE pixel order must be 'F' (column-major) or 'C' (row-major), got "
                    f"{order!r} (data.rle_order)")
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError) as e:
    raise DataError(f"an RLE mask shape must be a tuple of ints, got {shape!r}") from e
  if not shape or min(shape) < 1:
    raise DataError(f"an RLE mask shape must have positive sizes, got {shape}")
  return shape, int(np.prod(shape))


def _runs(text: str, shape: tuple[int, ...], n: int,
          relative: bool) -> tuple[np.ndarray, np.ndarray]:
  """0-based [begin, end) pixel ranges of the runs of `text`, validated."""
  where = f"RLE {_short(text)!r} for a {'x'.join(map(str, shape))} mask"
  tokens = str(text).split()
  if len(tokens) % 2:
    raise DataError(f"{where}: {len(tokens)} numbers, an odd count; expected pairs "
                    "'start length'")
  try:
    values = np.array(tokens, dtype=np.int64)
  except (ValueError, OverflowError):
    bad = next(t for t in tokens if not _is_int(t))
    raise DataError(f"{where}: {bad[:20]!r} is not an integer (of 64 bits)") from None
  starts, lengths = values[0::2], values[1::2]
  if (lengths < 0).any():
    k = int(np.flatnonzero(lengths < 0)[0])
    raise DataError(f"{where}: run {k} has a negative length {lengths[k]}")
  low = 0 if relative else 1
  if (starts < low).any():
    k = int(np.flatnonzero(starts < low)[0])
    what = "relative starts are >= 0" if relative else "absolute starts are 1-based (>= 1)"
    raise DataError(f"{where}: run {k} starts at {starts[k]}, but {what}")
  if (values > n).any():  # also keeps the sums below from overflowing
    k = int(np.flatnonzero(values > n)[0]) // 2
    raise DataError(f"{where}: run {k} (start {starts[k]}, length {lengths[k]}) goes past "
                    f"the image's {n} pixels")
  if relative:
    ends = np.cumsum(values)[1::2]
    begins = ends - lengths
  else:
    begins = starts - 1
    ends = begins + lengths
  if ends.size and ends.max() > n:
    k = int(np.flatnonzero(ends > n)[0])
    raise DataError(f"{where}: run {k} covers pixels [{begins[k]}, {ends[k]}), past the "
                    f"image's {n} pixels; check the shape, data.rle_relative and "
                    "data.rle_order")
  return begins, ends


def _is_int(token: str) -> bool:
  try:
    return -2**63 <= int(token) < 2**63
  except ValueError:
    return False


def is_empty(text: str | None) -> bool:
  """Whether `text` encodes an empty mask ("-1", "" or missing)."""
  return text is None or str(text).strip() in EMPTY


def decode_rle(text: str, shape: Sequence[int], *, relative: bool,
               order: str = "F") -> np.ndarray:
  """One RLE text as a uint8 0/1 mask of `shape` (H, W).

  Args:
    text: "start length start length ...", or "-1" / "" for an empty mask.
    shape: the mask's (H, W).
    relative: SIIM's relative starts (True) or absolute 1-based starts (False).
    order: "F" pixels numbered column-major (index = x * H + y), "C" row-major.

  Raises:
    DataError: quoting the text (shortened) and the shape when a token is not an
      integer, the count is odd, a start or length is negative (an absolute start
      below 1), or a run goes past the image.
  """
  shape, n = _check_layout(shape, order)
  if is_empty(text):
    return np.zeros(shape, np.uint8)
  begins, ends = _runs(text, shape, n, relative)
  edges = np.bincount(begins, minlength=n + 1) - np.bincount(ends, minlength=n + 1)
  flat = np.cumsum(edges[:n]) > 0  # runs may overlap (absolute): OR
  return flat.reshape(shape, order=order).astype(np.uint8)


def decode_rles(texts: Iterable[str], shape: Sequence[int], *, relative: bool,
                order: str = "F") -> np.ndarray:
  """The OR of the masks of several RLE texts (one image's rows), uint8 0/1."""
  out = np.zeros(_check_layout(shape, order)[0], np.uint8)
  for text in texts:
    out |= decode_rle(text, shape, relative=relative, order=order)
  return out


def encode_rle(mask: np.ndarray, *, relative: bool, order: str = "F",
               empty: str | None = None) -> str:
  """The RLE text of a mask (nonzero = foreground); `decode_rle` inverts it.

  Runs are maximal (adjacent pixels make one run). An empty mask gives `empty`,
  by default "-1" for relative RLE (SIIM) and "" for absolute RLE (Kaggle).
  """
  mask = np.asarray(mask)
  _check_layout(mask.shape, order)
  flat = np.concatenate([[False], mask.ravel(order=order) != 0, [False]])
  edges = np.flatnonzero(flat[1:] != flat[:-1])
  begins, ends = edges[0::2], edges[1::2]
  if not begins.size:
    return ("-1" if relative else "") if empty is None else empty
  starts = begins - np.concatenate([[0], ends[:-1]]) if relative else begins + 1
  return " ".join(map(str, np.stack([starts, ends - begins], axis=1).ravel().tolist()))
