"""A small reader of MetaImage files (`.mha`, or an `.mhd` header beside `.raw`/`.zraw` data).

MetaImage (ITK's MetaIO format) is a text header of `Key = Value` lines ending with
`ElementDataFile`, followed by raw voxels. This parser reads the fields that define the
voxels, which is all a training pipeline needs, instead of depending on SimpleITK (a
~50 MB binary wheel for one simple format):

  NDims, DimSize (x y z order), ElementType (MET_UCHAR, MET_CHAR, MET_SHORT, MET_USHORT,
  MET_INT, MET_UINT, MET_LONG_LONG, MET_ULONG_LONG, MET_FLOAT, MET_DOUBLE),
  ElementNumberOfChannels, ElementSpacing (or ElementSize), BinaryDataByteOrderMSB /
  ElementByteOrderMSB / ByteOrderMSB, CompressedData (zlib or gzip stream), HeaderSize
  (bytes to skip in a detached data file; -1 = the data is the file's last bytes) and
  ElementDataFile = LOCAL (the data follows the header) or one file name relative to the
  header's folder. Lists of slice files (`LIST`, `%d` patterns) are not supported.

Orientation fields (Offset, TransformMatrix, AnatomicalOrientation) are ignored: arrays
keep the stored voxel order, with the slowest axis first, so a 3-D image comes back as
(Z, Y, X) or (Z, Y, X, C) and a 2-D image as (Y, X) or (Y, X, C).
"""
from __future__ import annotations

import os
import pathlib
import zlib

import numpy as np

from medrep_jax.data.sources import DataError

ELEMENT_TYPES = {
    "MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_SHORT": "i2", "MET_USHORT": "u2",
    "MET_INT": "i4", "MET_UINT": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}
_MAX_HEADER = 1 << 16  # a header longer than this is not a MetaImage header
_MSB_KEYS = ("BinaryDataByteOrderMSB", "ElementByteOrderMSB", "ByteOrderMSB")


def _parse_header(path: pathlib.Path) -> tuple[dict[str, str], int]:
  """The header fields and the byte offset just after the `ElementDataFile` line."""
  try:
    with open(path, "rb") as f:
      head = f.read(_MAX_HEADER)
  except OSError as e:
    raise DataError(f"cannot read MetaImage {path}: {e.strerror or e}") from e
  fields: dict[str, str] = {}
  offset = 0
  while offset < len(head):
    end = head.find(b"\n", offset)
    end = len(head) if end < 0 else end
    line = head[offset:end].decode("latin-1").strip()
    offset = end + 1
    if not line:
      continue
    key, sep, value = line.partition("=")
    if not sep:
      raise DataError(f"{path} is not a MetaImage file: header line {line[:60]!r} is not "
                      "'Key = Value'")
    fields[key.strip()] = value.strip()
    if key.strip() == "ElementDataFile":
      return fields, offset
  raise DataError(f"{path} is not a complete MetaImage header: no 'ElementDataFile' line "
                  f"in its first {min(len(head), _MAX_HEADER)} bytes")


def _ints(path: pathlib.Path, fields: dict[str, str], key: str) -> list[int]:
  try:
    return [int(v) for v in fields[key].split()]
  except KeyError:
    raise DataError(f"MetaImage {path} has no {key} field; fields: {sorted(fields)}") from None
  except ValueError:
    raise DataError(f"MetaImage {path}: {key} = {fields[key]!r} is not a list of "
                    "integers") from None


def _flag(fields: dict[str, str], keys: tuple[str, ...]) -> bool:
  for k in keys:
    if k in fields:
      return fields[k].strip().lower() in ("true", "1", "yes")
  return False


def _payload(path: pathlib.Path, fields: dict[str, str], data_offset: int) -> tuple[bytes, str]:
  """The stored data bytes and a description of where they came from."""
  where = fields["ElementDataFile"]
  if where.upper() == "LOCAL":
    with open(path, "rb") as f:
      f.seek(data_offset)
      return f.read(), f"{path} (data after the header)"
  if where.upper().startswith("LIST") or "%" in where or len(where.split()) > 1:
    raise DataError(f"MetaImage {path}: ElementDataFile = {where!r} lists several files, "
                    "which is not supported; convert the image to one .mha file")
  data_path = pathlib.Path(path).parent / where
  try:
    with open(data_path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"MetaImage header {path} names the data file {data_path} "
                    f"(ElementDataFile = {where}), which cannot be read: "
                    f"{e.strerror or e}") from e
  return data, str(data_path)


def read_metaimage(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
  """Reads a MetaImage file.

  Args:
    path: an `.mha` file, or an `.mhd` header whose data file sits beside it.

  Returns:
    (array, spacing): the voxels in their stored dtype, slowest axis first ((Z, Y, X) for
    3-D, with a trailing channel axis when ElementNumberOfChannels > 1), and the voxel
    spacing of the spatial axes in the same order (ElementSpacing, default 1).

  Raises:
    DataError: naming the file and what is wrong (missing or bad field, unknown element
      type, undecompressable or truncated data).
  """
  path = pathlib.Path(path)
  fields, data_offset = _parse_header(path)
  dims = _ints(path, fields, "DimSize")
  ndims = int(fields.get("NDims", len(dims)))
  if len(dims) != ndims or any(d <= 0 for d in dims):
    raise DataError(f"MetaImage {path}: DimSize = {fields['DimSize']!r} does not give "
                    f"NDims = {ndims} positive sizes")
  etype = fields.get("ElementType", "")
  if etype not in ELEMENT_TYPES:
    raise DataError(f"MetaImage {path}: ElementType = {etype!r} is not supported; "
                    f"supported: {', '.join(ELEMENT_TYPES)}")
  channels = int(fields.get("ElementNumberOfChannels", "1"))
  dtype = np.dtype(ELEMENT_TYPES[etype]).newbyteorder(
      ">" if _flag(fields, _MSB_KEYS) else "<")
  spacing_text = fields.get("ElementSpacing", fields.get("ElementSize", ""))
  try:
    spacing = [float(v) for v in spacing_text.split()] or [1.0] * ndims
  except ValueError:
    raise DataError(f"MetaImage {path}: ElementSpacing = {spacing_text!r} is not a list of "
                    "numbers") from None
  if len(spacing) != ndims:
    raise DataError(f"MetaImage {path}: ElementSpacing has {len(spacing)} values for "
                    f"NDims = {ndims}")
  data, source = _payload(path, fields, data_offset)
  if _flag(fields, ("CompressedData",)):
    try:
      data = zlib.decompressobj(47).decompress(data)  # 47: zlib or gzip header
    except zlib.error as e:
      raise DataError(f"MetaImage {path}: CompressedData = True but the data in {source} "
                      f"cannot be decompressed ({e}); the file is damaged or truncated") from e
  expected = int(np.prod(dims)) * channels * dtype.itemsize
  header_size = int(fields.get("HeaderSize", "0"))
  if header_size == -1:
    data = data[len(data) - expected:] if len(data) >= expected else data
  elif header_size > 0 and fields["ElementDataFile"].upper() != "LOCAL":
    data = data[header_size:]
  if len(data) < expected:
    raise DataError(f"MetaImage {path}: the data in {source} has {len(data)} bytes but "
                    f"DimSize {dims} x {channels} channel(s) of {etype} needs {expected}; "
                    "the file is truncated")
  shape = tuple(reversed(dims)) + ((channels,) if channels > 1 else ())
  array = np.frombuffer(data, dtype, count=expected // dtype.itemsize).reshape(shape)
  return array.astype(dtype.newbyteorder("=")), tuple(reversed(spacing))
