"""Host-side transforms: shapes, dtypes, nearest-neighbour masks, grain use."""
import grain
import ml_collections
import numpy as np
import pytest

from medrep_jax.data import transforms as T
from medrep_jax.data.imageio import resize_mask
from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.sources import DataError


def _record(h=40, w=50, c=3, dtype=np.uint8, mask_ids=(0, 1, 2)):
  rng = np.random.default_rng(0)
  if dtype == np.uint8:
    image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
  else:
    image = rng.uniform(-1024, 2000, (h, w, c)).astype(np.float32)
  mask = rng.choice(np.array(mask_ids, np.uint8), size=(h, w))
  return {"image": image, "mask": mask, "label": np.int32(1), "index": np.int64(7)}


def _cfg(**kw):
  base = dict(image_size=32, channels=3, normalize="unit")
  return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("c,dtype,channels", [(3, np.uint8, 3), (1, np.uint8, 3),
                                              (3, np.uint8, 1), (1, np.float32, 1)])
def test_build_transforms_output(c, dtype, channels):
  rec = _record(c=c, dtype=dtype)
  cfg = _cfg(channels=channels, window_level=500.0, window_width=3000.0)
  out = T.apply_transforms(rec, T.build_transforms(cfg))
  assert out["image"].shape == (32, 32, channels) and out["image"].dtype == np.float32
  assert out["mask"].shape == (32, 32) and out["mask"].dtype == np.uint8
  assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
  assert set(np.unique(out["mask"])) <= {0, 1, 2}
  assert out["label"] == 1 and out["index"] == 7


def test_resize_keeps_mask_values_and_float_images():
  rec = _record(dtype=np.float32, c=1, mask_ids=(0, 3, 7))
  out = T.Resize((17, 23)).map(rec)
  assert out["image"].shape == (17, 23, 1) and out["image"].dtype == np.float32
  assert set(np.unique(out["mask"])) <= {0, 3, 7} and out["mask"].shape == (17, 23)
  smooth = T.Resize(8).map({"image": np.full((40, 40, 1), -1000.0, np.float32)})["image"]
  np.testing.assert_allclose(smooth, -1000.0)  # HU values survive resizing
  up = T.Resize(80).map(rec)
  assert set(np.unique(up["mask"])) <= {0, 3, 7}


def test_center_crop_moves_image_and_mask_together():
  rows, cols = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
  label_of = lambda r, c: ((7 * r + 3 * c) % 5).astype(np.uint8)
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
  rec = {"image": image, "mask": label_of(rows, cols)}
  centre = T.CenterCrop(10).map(rec)
  r, c = centre["image"][..., 0].astype(int), centre["image"][..., 1].astype(int)
  np.testing.assert_array_equal(centre["mask"], label_of(r, c))
  np.testing.assert_array_equal(centre["mask"], rec["mask"][10:20, 10:20])
  with pytest.raises(DataError, match="smaller than the crop"):
    T.CenterCrop(40).map(rec)


def test_build_transforms_deterministic_and_same_in_grain():
  src = Phantoms("val", num_examples=8)
  tfs = T.build_transforms(_cfg(channels=1))
  assert not any(isinstance(t, grain.transforms.RandomMap) for t in tfs)
  ds = grain.MapDataset.source(src)
  for t in tfs:
    ds = ds.map(t)
  for i, rec in enumerate(ds):
    np.testing.assert_array_equal(rec["image"], T.apply_transforms(src[i], tfs)["image"])
  batch = next(iter(grain.MapDataset.source(src).map(T.Resize(32)).batch(4)))
  assert batch["image"].shape == (4, 32, 32, 1)


def test_normalize_channels_cast_and_checks():
  rec = _record(c=3)
  unit = T.Normalize("unit").map(rec)["image"]
  np.testing.assert_allclose(unit, rec["image"] / 255.0, rtol=1e-6)
  std = T.Normalize("standardize", mean=0.5, std=0.25).map(rec)["image"]
  np.testing.assert_allclose(std, (rec["image"] / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
  per_image = T.Normalize("standardize").map(rec)["image"]
  assert abs(per_image.mean()) < 1e-4 and abs(per_image.std() - 1) < 1e-3
  hu = {"image": np.array([[[-2000.0], [0.0], [3000.0]]], np.float32)}
  np.testing.assert_allclose(T.Normalize(value_range=(-1000, 1000)).map(hu)["image"].ravel(),
                             [0.0, 0.5, 1.0])
  grey = T.ToChannels(1).map(rec)["image"]
  assert grey.shape == (40, 50, 1) and grey.dtype == np.uint8
  assert T.ToChannels(3).map({"image": grey})["image"].shape == (40, 50, 3)
  assert T.Cast((("mask", "int32"),)).map(rec)["mask"].dtype == np.int32
  bad = dict(rec, mask=rec["mask"][:10])
  with pytest.raises(DataError, match=r"element 7.*\(40, 50, 3\).*\(10, 50\)"):
    T.CheckShapes(40).map(bad)
  with pytest.raises(DataError, match="element 7"):
    T.Resize(16).map(bad)
  with pytest.raises(DataError, match="Normalize mode"):
    T.Normalize("zscore")


def _with_regions(rec, k=3):
  """`rec` plus a region mask "roi" and K stacked masks "masks" of its size."""
  h, w = rec["mask"].shape
  rng = np.random.default_rng(1)
  roi = np.zeros((h, w), np.uint8)
  roi[h // 4:, : w // 2] = 1
  masks = rng.integers(0, 2, (k, h, w)).astype(np.uint8)
  return {**rec, "roi": roi, "masks": masks}


def test_roi_and_stacked_masks_follow_the_image():
  rec = _with_regions(_record())
  out = T.Resize((17, 23)).map(rec)
  np.testing.assert_array_equal(out["roi"], resize_mask(rec["roi"], (17, 23)))
  assert out["masks"].shape == (3, 17, 23) and out["masks"].dtype == np.uint8
  for k in range(3):  # nearest, each mask like "mask"
    np.testing.assert_array_equal(out["masks"][k], resize_mask(rec["masks"][k], (17, 23)))
  crop = T.CenterCrop(10).map(rec)
  np.testing.assert_array_equal(crop["roi"], rec["roi"][15:25, 20:30])
  np.testing.assert_array_equal(crop["masks"], rec["masks"][:, 15:25, 20:30])
  full = T.apply_transforms(rec, T.build_transforms(_cfg()))
  assert full["roi"].shape == (32, 32) and full["masks"].shape == (3, 32, 32)
  assert set(np.unique(full["roi"])) == {0, 1}
  with pytest.raises(DataError, match=r"element 7.*\(40, 50, 3\).*roi shape \(40, 49\)"):
    T.CheckShapes(40).map(dict(rec, roi=rec["roi"][:, 1:]))
  with pytest.raises(DataError, match=r"masks shape \(3, 40, 49\) \(K masks first\)"):
    T.Resize(16).map(dict(rec, masks=rec["masks"][..., 1:]))


def test_whole_volumes_resize_in_plane_and_keep_depth():
  rng = np.random.default_rng(2)
  vol = {"image": rng.uniform(-1000, 1000, (5, 40, 50, 1)).astype(np.float32),
         "mask": rng.integers(0, 3, (5, 40, 50)).astype(np.uint8),
         "roi": np.ones((5, 40, 50), np.uint8), "index": np.int64(3)}
  tfs = T.build_transforms(_cfg(channels=1, window_level=0.0, window_width=2000.0))
  out = T.apply_transforms(vol, tfs)
  assert out["image"].shape == (5, 32, 32, 1) and out["image"].dtype == np.float32
  assert out["mask"].shape == out["roi"].shape == (5, 32, 32)
  for d in range(5):  # each slice as the 2-D pipeline makes it
    plane = T.apply_transforms({"image": vol["image"][d], "mask": vol["mask"][d]}, tfs)
    np.testing.assert_allclose(out["image"][d], plane["image"], atol=1e-6)
    np.testing.assert_array_equal(out["mask"][d], plane["mask"])
  crop = T.CenterCrop(8).map(vol)
  np.testing.assert_array_equal(crop["image"], vol["image"][:, 16:24, 21:29])
  np.testing.assert_array_equal(crop["mask"], vol["mask"][:, 16:24, 21:29])
  rgb = T.ToChannels(3).map(vol)["image"]
  assert rgb.shape == (5, 40, 50, 3)
  with pytest.raises(DataError, match=r"element 3.*\(5, 40, 50, 1\).*mask shape \(40, 50\)"):
    T.Resize(8).map(dict(vol, mask=vol["mask"][0]))
  with pytest.raises(DataError, match=r"image shape \(40, 50\).*data.volume='whole'"):
    T.Resize(8).map({"image": vol["image"][0, ..., 0]})
