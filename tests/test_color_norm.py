"""Modified Reinhard colour normalization (CIELAB) and pad-to-square resizing."""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from medrep_jax.data import color
from medrep_jax.data import transforms as T
from medrep_jax.data.sources import DataError


def _image(seed, lo, hi, shape=(24, 20, 3)):
  """A smooth-ish colour image whose values stay away from 0 and 255 (no clipping)."""
  rng = np.random.default_rng(seed)
  return rng.integers(lo, hi, shape).astype(np.uint8)


def _png(path, image):
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return str(path)


def _cfg(**kw):
  base = dict(image_size=20, channels=0, normalize="unit", color_norm="",
              color_norm_reference="", color_norm_stats=(), resize_mode="stretch")
  return ml_collections.ConfigDict({**base, **kw})


# ---------------------------------------------------------------- colour space


def test_lab_known_values_and_round_trip():
  rgb = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
  lab = color.srgb_to_lab(rgb)
  np.testing.assert_allclose(lab[0], [100, 0, 0], atol=1e-6)
  np.testing.assert_allclose(lab[1], [0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.01)  # sRGB red, D65
  np.testing.assert_allclose(lab[3, 1:], 0, atol=1e-9)  # greys have a = b = 0
  np.testing.assert_allclose(color.grey_to_lightness(rgb[3:, :1])[:, 0], lab[3:, 0])
  x = np.random.default_rng(0).uniform(0, 1, (50, 3))
  np.testing.assert_allclose(color.lab_to_srgb(color.srgb_to_lab(x)), x, atol=1e-9)
  v = np.linspace(0, 1, 11)
  np.testing.assert_allclose(color.lightness_to_grey(color.grey_to_lightness(v)), v, atol=1e-9)


# ---------------------------------------------------------------- Reinhard


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-3), (np.uint8, 0.3)])
def test_reinhard_matches_reference_lab_statistics(dtype, tol):
  src, ref = _image(0, 60, 140), _image(1, 110, 200)
  ref[..., 2] = ref[..., 2] // 2 + 60  # a different hue, still inside the gamut
  mean, std = color.lab_stats(ref)
  if dtype == np.float32:
    src = src.astype(np.float32) / 255
  out = T.ReinhardNormalize(tuple(mean), tuple(std)).map({"image": src, "mask": 1})
  assert out["image"].dtype == dtype and out["image"].shape == src.shape and out["mask"] == 1
  got_mean, got_std = color.lab_stats(out["image"])
  np.testing.assert_allclose(got_mean, mean, atol=tol)
  np.testing.assert_allclose(got_std, std, atol=tol)
  before_mean, _ = color.lab_stats(src)
  assert np.abs(before_mean - mean).max() > 5  # the test would fail without the transform


def test_reinhard_grey_uses_lightness_only():
  grey = _image(2, 40, 120, (16, 16, 1))
  out = color.reinhard(grey, (60.0,), (8.0,))
  assert out.shape == grey.shape and out.dtype == np.uint8
  mean, std = color.lab_stats(out)
  assert mean.shape == (1,) and mean[0] == pytest.approx(60, abs=0.3)
  assert std[0] == pytest.approx(8, abs=0.3)
  # The grey image and its RGB copy give the same result (a = b = 0 stay 0).
  rgb = color.reinhard(np.repeat(grey, 3, -1), (60.0, 0.0, 0.0), (8.0, 0.0, 0.0))
  np.testing.assert_array_equal(rgb, np.repeat(out, 3, -1))
  # Colour statistics applied to a grey image use their L part.
  np.testing.assert_array_equal(color.reinhard(grey, (60.0, 5.0, 5.0), (8.0, 3.0, 3.0)), out)


def test_reinhard_is_identity_when_the_image_is_the_reference(tmp_path):
  image = _image(3, 0, 256)
  path = _png(tmp_path / "ref.png", image)
  out = T.ReinhardNormalize(*color.reference_stats(path)).map({"image": image})["image"]
  np.testing.assert_array_equal(out, image)
  rec = {"image": image, "mask": np.zeros((24, 20), np.uint8)}
  plain = T.apply_transforms(dict(rec), T.build_transforms(_cfg()))
  tfs = T.build_transforms(_cfg(color_norm="reinhard", color_norm_reference=path))
  assert isinstance(tfs[0], T.ReinhardNormalize)
  np.testing.assert_allclose(T.apply_transforms(dict(rec), tfs)["image"], plain["image"])


def test_reference_from_stats_folder_and_relative_path(tmp_path):
  a, b = _image(4, 50, 150), _image(5, 100, 220)
  (tmp_path / "ref").mkdir()
  _png(tmp_path / "ref" / "a.png", a)
  _png(tmp_path / "ref" / "b.png", b)
  (ma, sa), (mb, sb) = color.lab_stats(a), color.lab_stats(b)
  mean, std = color.reference_stats(tmp_path / "ref")
  np.testing.assert_allclose(mean, (ma + mb) / 2, atol=1e-9)
  np.testing.assert_allclose(std, (sa + sb) / 2, atol=1e-9)
  cfg = _cfg(name="image_folder", root=str(tmp_path), color_norm="reinhard",
             color_norm_reference="ref")
  t = T.build_transforms(cfg)[0]
  np.testing.assert_allclose(t.mean, mean)
  np.testing.assert_allclose(t.std, std)
  t = T.build_transforms(_cfg(color_norm="reinhard", color_norm_stats=(50, 1, 2, 9, 3, 4)))[0]
  assert t.mean == (50, 1, 2) and t.std == (9, 3, 4)


def test_reference_errors_name_the_field_and_file(tmp_path):
  missing = tmp_path / "nope.png"
  with pytest.raises(DataError, match=r"data\.color_norm_reference.*nope\.png"):
    T.build_transforms(_cfg(color_norm="reinhard", color_norm_reference=str(missing)))
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(DataError, match=r"data\.color_norm_reference.*bad\.png"):
    T.build_transforms(_cfg(color_norm="reinhard", color_norm_reference=str(bad)))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no image"):
    color.reference_stats(tmp_path / "empty")
  with pytest.raises(DataError, match="needs exactly one"):
    T.build_transforms(_cfg(color_norm="reinhard"))
  with pytest.raises(DataError, match="data.color_norm must be"):
    T.build_transforms(_cfg(color_norm="macenko"))
  with pytest.raises(DataError, match="data.color_norm is ''"):
    T.build_transforms(_cfg(color_norm_stats=(50, 9)))
  with pytest.raises(DataError, match="6 numbers"):
    T.build_transforms(_cfg(color_norm="reinhard", color_norm_stats=(1, 2, 3)))
  with pytest.raises(DataError, match="HU data has no colour"):
    color.reinhard(np.full((4, 4, 1), -1000.0, np.float32), (50.0,), (9.0,))


# ---------------------------------------------------------------- pad to square


def _lesion_record(h=30, w=20):
  """Image and mask of a 10 x 8 lesion; the image encodes the mask (100 + 40 * id)."""
  mask = np.zeros((h, w), np.uint8)
  mask[10:20, 6:14] = 1
  image = (100 + 40 * mask)[..., None].astype(np.uint8)
  return {"image": image, "mask": mask, "roi": np.ones((h, w), np.uint8)}


def _bbox(mask):
  rows, cols = np.nonzero(mask)
  return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_pad_to_square_then_resize_keeps_alignment_and_aspect():
  rec = _lesion_record()
  padded = T.PadToSquare().map(rec)
  assert padded["image"].shape == (30, 30, 1) and padded["mask"].shape == (30, 30)
  np.testing.assert_array_equal(padded["mask"][:, 5:25], rec["mask"])
  np.testing.assert_array_equal(padded["image"][:, 5:25], rec["image"])
  assert not padded["image"][:, :5].any() and not padded["image"][:, 25:].any()
  assert not padded["mask"][:, :5].any() and not padded["roi"][:, 25:].any()
  assert padded["roi"].sum() == 30 * 20  # the padding is outside the region

  tfs = T.build_transforms(_cfg(image_size=15, resize_mode="pad"))
  assert isinstance(tfs[0], T.PadToSquare) and isinstance(tfs[1], T.Resize)
  out = T.apply_transforms(dict(rec), tfs)
  assert out["image"].shape == (15, 15, 1) and out["mask"].shape == (15, 15)
  assert _bbox(out["mask"]) == (5, 4)  # 10 x 8 halved: the aspect ratio is kept
  stretched = T.apply_transforms(dict(rec), T.build_transforms(_cfg(image_size=15)))
  assert _bbox(stretched["mask"])[1] > 4  # stretching widens the lesion

  up = T.Resize(60).map(padded)  # image and mask move together: the image encodes the mask
  inside = up["mask"] == 1
  np.testing.assert_allclose(up["image"][..., 0][inside].mean(), 140, atol=3)
  core = np.zeros_like(inside)
  core[24:36, 26:34] = True  # the lesion's interior after padding (+5 cols) and x2
  assert inside[core].all() and (up["image"][..., 0][core] == 140).all()


def test_pad_to_square_wide_images_volumes_and_stacked_masks():
  image = np.ones((3, 4, 10, 2), np.float32)  # a (D, H, W, C) volume, wider than high
  rec = {"image": image, "mask": np.ones((3, 4, 10), np.uint8),
         "masks": np.ones((2, 3, 4, 10), np.uint8)}
  out = T.PadToSquare(value=-5.0).map(rec)
  assert out["image"].shape == (3, 10, 10, 2) and out["masks"].shape == (2, 3, 10, 10)
  np.testing.assert_array_equal(out["image"][:, :3], -5.0)  # rows 0-2 and 7-9 padded
  np.testing.assert_array_equal(out["image"][:, 3:7], 1.0)
  assert out["mask"][:, 7:].sum() == 0 and out["masks"][:, :, 3:7].all()
  square = {"image": np.ones((5, 5, 1), np.uint8)}
  np.testing.assert_array_equal(T.PadToSquare(value=-5.0).map(square)["image"], 1)
  with pytest.raises(DataError, match="data.resize_mode"):
    T.build_transforms(_cfg(resize_mode="crop"))


def test_pad_uses_the_window_low_end_for_hu_images():
  rec = {"image": np.full((10, 6, 1), 40.0, np.float32)}
  cfg = _cfg(image_size=10, channels=1, resize_mode="pad", window_level=40.0,
             window_width=400.0)
  out = T.apply_transforms(rec, T.build_transforms(cfg))["image"][..., 0]
  np.testing.assert_allclose(out[:, :2], 0.0)  # the padding is black after windowing
  np.testing.assert_allclose(out[:, 2:8], 0.5)


def test_a_folder_mixing_grey_and_colour_gives_l_only_statistics(tmp_path):
  """BUSI stores some grey scans as RGB: the reference is then the mean L statistics."""
  rgb, grey = _image(4, 50, 150), _image(5, 100, 220)[..., :1]
  (tmp_path / "ref").mkdir()
  _png(tmp_path / "ref" / "a.png", rgb)
  _png(tmp_path / "ref" / "b.png", grey)
  (ma, sa), (mb, sb) = color.lab_stats(rgb), color.lab_stats(grey)
  mean, std = color.reference_stats(tmp_path / "ref")
  assert len(mean) == len(std) == 1
  np.testing.assert_allclose(mean, (ma[:1] + mb) / 2, atol=1e-9)
  np.testing.assert_allclose(std, (sa[:1] + sb) / 2, atol=1e-9)
