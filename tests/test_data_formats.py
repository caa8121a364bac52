"""formats.py: every file format against NumPy references, slices, window/level, bad files."""
import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medrep_jax.data import dicom, formats
from medrep_jax.data.sources import DataError

_MET = {np.dtype("u1"): "MET_UCHAR", np.dtype("i1"): "MET_CHAR", np.dtype("i2"): "MET_SHORT",
        np.dtype("u2"): "MET_USHORT", np.dtype("i4"): "MET_INT", np.dtype("u4"): "MET_UINT",
        np.dtype("f4"): "MET_FLOAT", np.dtype("f8"): "MET_DOUBLE"}


def write_mha(path, arr, spacing=None, *, compress=False, detached=False, msb=False,
              channels=1, gzip_stream=False):
  """A tiny MetaImage writer: `arr` is (Z, Y, X[, C]) (or (Y, X)); DimSize is x y z."""
  arr = np.asarray(arr)
  spatial = arr.shape[:-1] if channels > 1 else arr.shape
  dims = list(reversed(spatial))
  spacing = spacing or (1.0,) * len(dims)
  data = arr.astype(arr.dtype.newbyteorder(">" if msb else "<")).tobytes()
  if compress:
    data = gzip.compress(data) if gzip_stream else zlib.compress(data)
  raw_name = path.stem + (".zraw" if compress else ".raw")
  lines = [f"ObjectType = Image", f"NDims = {len(dims)}",
           f"DimSize = {' '.join(map(str, dims))}",
           f"ElementSpacing = {' '.join(str(s) for s in reversed(spacing))}",
           f"BinaryDataByteOrderMSB = {msb}", f"CompressedData = {compress}",
           f"ElementNumberOfChannels = {channels}", f"ElementType = {_MET[arr.dtype]}",
           f"ElementDataFile = {raw_name if detached else 'LOCAL'}"]
  header = ("\n".join(lines) + "\n").encode()
  if detached:
    path.write_bytes(header)
    (path.parent / raw_name).write_bytes(data)
  else:
    path.write_bytes(header + data)
  return path


def _volume(dtype=np.int16, shape=(4, 5, 6), seed=0):
  rng = np.random.default_rng(seed)
  if np.dtype(dtype).kind == "f":
    return rng.normal(size=shape).astype(dtype)
  info = np.iinfo(dtype)
  return rng.integers(max(info.min, -2000), min(info.max, 3000), size=shape).astype(dtype)


# ---------------------------------------------------------------- suffixes


def test_suffixes():
  assert formats.suffix_of("a/B.NII.GZ") == ".nii.gz" and formats.stem_of("x/b.nii.gz") == "b"
  assert formats.is_supported("x.mhd") and formats.is_supported("y.JPG")
  assert not formats.is_supported("x.raw") and not formats.is_supported("notes.txt")
  assert formats.is_volume("a.nii") and formats.is_volume("a.mha") and not formats.is_volume("a.npy")


# ---------------------------------------------------------------- images and arrays


def test_pillow_images_keep_dtype_and_channels(tmp_path):
  grey = np.arange(30, dtype=np.uint8).reshape(5, 6)
  rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3)).astype(np.uint8)
  deep = (np.arange(30, dtype=np.uint16) * 2000).reshape(5, 6)
  Image.fromarray(grey).save(tmp_path / "g.png")
  Image.fromarray(rgb).save(tmp_path / "c.bmp")
  Image.fromarray(deep).save(tmp_path / "d.png")
  Image.fromarray(grey).save(tmp_path / "g.tif")
  np.testing.assert_array_equal(formats.read_array(tmp_path / "g.png"), grey)
  np.testing.assert_array_equal(formats.read_array(tmp_path / "g.tif"), grey)
  np.testing.assert_array_equal(formats.read_array(tmp_path / "c.bmp"), rgb)
  got = formats.read_array(tmp_path / "d.png")
  assert got.dtype.kind in "ui" and got.max() == deep.max()
  np.testing.assert_array_equal(got.astype(np.int64), deep)
  assert formats.to_hwc(grey).shape == (5, 6, 1) and formats.to_hwc(rgb).shape == (5, 6, 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32, np.float64, bool])
def test_npy_and_npz_any_dtype(tmp_path, dtype):
  arr = (_volume(np.int16, (3, 7)) > 0) if dtype is bool else _volume(dtype, (3, 7))
  np.save(tmp_path / "a.npy", arr)
  np.savez(tmp_path / "one.npz", only=arr)
  np.savez_compressed(tmp_path / "two.npz", x=arr, y=arr[::-1])
  for got in (formats.read_array(tmp_path / "a.npy"), formats.read_array(tmp_path / "one.npz"),
              formats.read_array(tmp_path / "two.npz", key="x")):
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr)
  np.testing.assert_array_equal(formats.read_array(tmp_path / "two.npz", key="y"), arr[::-1])


def test_npz_bad_key_and_object_arrays(tmp_path):
  np.savez(tmp_path / "two.npz", x=np.zeros(3), y=np.ones(3))
  with pytest.raises(DataError, match=r"two\.npz.*no array 'z'.*\['x', 'y'\]"):
    formats.read_array(tmp_path / "two.npz", key="z")
  with pytest.raises(DataError, match=r"two\.npz holds 2 arrays \['x', 'y'\]"):
    formats.read_array(tmp_path / "two.npz")
  np.savez(tmp_path / "obj.npz", x=np.array([np.zeros(2), None], dtype=object))
  with pytest.raises(DataError, match=r"obj\.npz: array 'x' holds Python objects"):
    formats.read_array(tmp_path / "obj.npz")
  np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
  with pytest.raises(DataError, match=r"obj\.npy holds Python objects"):
    formats.read_array(tmp_path / "obj.npy")


def test_truncated_npy_and_unsupported(tmp_path):
  np.save(tmp_path / "a.npy", np.zeros((20, 20), np.float32))
  data = (tmp_path / "a.npy").read_bytes()
  (tmp_path / "a.npy").write_bytes(data[:300])
  with pytest.raises(DataError, match=r"a\.npy.*truncated"):
    formats.read_array(tmp_path / "a.npy")
  (tmp_path / "x.txt").write_text("hi")
  with pytest.raises(DataError, match=r"x\.txt: unsupported file type '\.txt'"):
    formats.read_array(tmp_path / "x.txt")
  with pytest.raises(DataError, match=r"missing\.png does not exist"):
    formats.read_array(tmp_path / "missing.png")


# ---------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_is_transposed_to_zyx_with_spacing(tmp_path, name):
  xyz = _volume(np.int16, (6, 5, 4))  # NIfTI voxel order [x, y, z]
  nib.Nifti1Image(xyz, np.diag([0.5, 0.75, 2.5, 1.0])).to_filename(tmp_path / name)
  vol = formats.read_volume(tmp_path / name)
  assert vol.array.shape == (4, 5, 6) and vol.array.dtype == np.int16
  np.testing.assert_array_equal(vol.array, xyz.transpose(2, 1, 0))
  assert vol.spacing == pytest.approx((2.5, 0.75, 0.5)) and vol.path.endswith(name)
  np.testing.assert_array_equal(formats.read_array(tmp_path / name)[2], xyz[:, :, 2].T)


def test_nifti_scaling_is_applied(tmp_path):
  xyz = _volume(np.int16, (3, 3, 2))
  img = nib.Nifti1Image(xyz, np.eye(4))
  img.header.set_slope_inter(2.0, -1024.0)
  img.to_filename(tmp_path / "ct.nii.gz")
  got = formats.read_array(tmp_path / "ct.nii.gz")
  np.testing.assert_allclose(got, xyz.transpose(2, 1, 0) * 2.0 - 1024.0)


def test_ibsi_phantom_nifti_matches_its_npy(data_dir):
  root = data_dir / "ibsi_digital_phantom"
  xyz = np.load(root / "phantom.npy")  # indexed [x, y, z]
  np.testing.assert_allclose(formats.read_array(root / "phantom.nii.gz"),
                             xyz.transpose(2, 1, 0))


def test_corrupt_and_truncated_nifti(tmp_path):
  (tmp_path / "junk.nii").write_bytes(b"not a nifti file at all" * 20)
  with pytest.raises(DataError, match=r"cannot read NIfTI .*junk\.nii"):
    formats.read_array(tmp_path / "junk.nii")
  nib.Nifti1Image(_volume(np.float32, (8, 8, 8)), np.eye(4)).to_filename(tmp_path / "t.nii")
  data = (tmp_path / "t.nii").read_bytes()
  (tmp_path / "t.nii").write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"cannot read NIfTI .*t\.nii"):
    formats.read_array(tmp_path / "t.nii")


# ---------------------------------------------------------------- MetaImage


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32,
                                   np.float32, np.float64])
def test_metaimage_element_types(tmp_path, dtype):
  arr = _volume(dtype, (3, 4, 5))
  vol = formats.read_volume(write_mha(tmp_path / "v.mha", arr, (3.0, 0.8, 0.7)))
  assert vol.array.dtype == arr.dtype and vol.spacing == (3.0, 0.8, 0.7)
  np.testing.assert_array_equal(vol.array, arr)


@pytest.mark.parametrize("kw", [dict(compress=True), dict(compress=True, gzip_stream=True),
                                dict(detached=True), dict(detached=True, compress=True),
                                dict(msb=True), dict(channels=3)])
def test_metaimage_layouts(tmp_path, kw):
  shape = (3, 4, 5, 3) if kw.get("channels") else (3, 4, 5)
  arr = _volume(np.int16, shape)
  suffix = ".mhd" if kw.get("detached") else ".mha"
  got = formats.read_array(write_mha(tmp_path / f"v{suffix}", arr, **kw))
  np.testing.assert_array_equal(got, arr)


def test_metaimage_2d(tmp_path):
  arr = _volume(np.uint8, (7, 9))
  vol = formats.read_volume(write_mha(tmp_path / "s.mha", arr, (0.5, 0.25)))
  np.testing.assert_array_equal(vol.array, arr)
  assert vol.spacing == (0.5, 0.25)


def test_metaimage_errors(tmp_path):
  arr = _volume(np.int16, (3, 4, 5))
  path = write_mha(tmp_path / "v.mhd", arr, detached=True)
  raw = tmp_path / "v.raw"
  raw.write_bytes(raw.read_bytes()[:50])
  with pytest.raises(DataError, match=r"v\.mhd: the data in .*v\.raw has 50 bytes but .*120"):
    formats.read_array(path)
  raw.unlink()
  with pytest.raises(DataError, match=r"v\.mhd names the data file .*v\.raw"):
    formats.read_array(path)
  data = write_mha(tmp_path / "z.mha", arr, compress=True).read_bytes()
  (tmp_path / "z.mha").write_bytes(data[:-40] + b"\x00" * 7)
  with pytest.raises(DataError, match=r"z\.mha.*(cannot be decompressed|truncated)"):
    formats.read_array(tmp_path / "z.mha")
  text = (tmp_path / "v.mhd").read_text().replace("MET_SHORT", "MET_WEIRD")
  (tmp_path / "w.mhd").write_text(text)
  with pytest.raises(DataError, match=r"w\.mhd: ElementType = 'MET_WEIRD' is not supported"):
    formats.read_array(tmp_path / "w.mhd")
  (tmp_path / "n.mha").write_bytes(b"\x89PNG garbage\n" * 5)
  with pytest.raises(DataError, match=r"n\.mha is not a MetaImage file"):
    formats.read_array(tmp_path / "n.mha")


# ---------------------------------------------------------------- slices


def test_volume_slices_and_take_slice():
  vol = _volume(np.int16, (6, 5, 4))
  mask = np.zeros_like(vol)
  mask[1, 2, 3] = mask[3, 0, 0] = mask[4, 4, 1] = 1
  assert formats.volume_slices(vol) == [0, 1, 2, 3, 4, 5]
  assert formats.volume_slices(vol, stride=2) == [0, 2, 4]
  assert formats.volume_slices(vol, mask=mask, only_foreground=True) == [1, 3, 4]
  assert formats.volume_slices(vol, mask=mask, only_foreground=True, stride=2) == [1, 4]
  assert formats.volume_slices(vol, axis=2, mask=mask, only_foreground=True) == [0, 1, 3]
  assert formats.volume_slices(vol, axis=-1) == [0, 1, 2, 3]
  for axis in range(3):
    for i in range(vol.shape[axis]):
      ref = vol[(slice(None),) * axis + (i,)]
      np.testing.assert_array_equal(formats.take_slice(vol, i, axis), ref)
  rgb = _volume(np.uint8, (3, 4, 5, 3))
  np.testing.assert_array_equal(formats.take_slice(rgb, 1, axis=1), rgb[:, 1])
  with pytest.raises(DataError, match=r"only_foreground needs the mask"):
    formats.volume_slices(vol, only_foreground=True)
  with pytest.raises(DataError, match=r"shape \(5, 4\).*axis 0"):
    formats.volume_slices(vol[0])
  with pytest.raises(DataError, match=r"slice 9 is out of range"):
    formats.take_slice(vol, 9, 0)
  with pytest.raises(DataError, match=r"mask volume of shape \(2, 2, 2\)"):
    formats.volume_slices(vol, mask=np.ones((2, 2, 2)), only_foreground=True)


# ---------------------------------------------------------------- values


def test_window_level_against_numpy_and_dicom():
  hu = np.random.default_rng(0).uniform(-1500, 1500, (16, 16)).astype(np.float32)
  level, width = -600.0, 1500.0
  ref = (np.clip(hu, level - width / 2, level + width / 2) - (level - width / 2)) / width
  got = formats.to_image(hu, window=(level, width))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-6)
  for output in ("hu", "unit"):
    np.testing.assert_array_equal(formats.apply_window(hu, (level, width), output),
                                  dicom.apply_window(hu, (level, width), output))
  ints = hu.astype(np.int16)
  np.testing.assert_allclose(formats.to_image(ints, window=(40, 400)),
                             (np.clip(ints, -160, 240) + 160) / 400, atol=1e-6)
  with pytest.raises(DataError, match=r"width > 0.*data\.window_width"):
    formats.to_image(hu, window=(0, 0))


def test_value_range_rules():
  u8 = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(formats.to_image(u8), u8 / 255)
  u16 = np.array([[100, 600, 1100]], np.uint16)
  np.testing.assert_allclose(formats.to_image(u16), [[0, 0.5, 1]])
  np.testing.assert_allclose(formats.to_image(u16, value_range="dtype"), u16 / 65535, rtol=1e-6)
  unit = np.array([[0.1, 0.7]], np.float64)
  np.testing.assert_allclose(formats.to_image(unit), unit)
  wide = np.array([[-5.0, 0.0, 5.0]], np.float32)
  np.testing.assert_allclose(formats.to_image(wide), [[0, 0.5, 1]])
  np.testing.assert_allclose(formats.to_image(unit, value_range="minmax"), [[0, 1]])
  np.testing.assert_allclose(formats.to_image(wide, value_range="unit"), [[0, 0, 1]])
  np.testing.assert_array_equal(formats.to_image(np.full((2, 2), 7.0)), np.zeros((2, 2)))
  np.testing.assert_array_equal(formats.to_image(np.array([True, False])), [1, 0])
  with pytest.raises(DataError, match=r"image in scan\.npy .*NaN or Inf"):
    formats.to_image(np.array([np.nan, 1.0]), where="scan.npy")
  with pytest.raises(DataError, match=r"value_range must be one of"):
    formats.to_image(u8, value_range="bogus")
