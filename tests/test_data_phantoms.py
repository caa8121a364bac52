"""Procedural phantoms: determinism, shapes, balance, masks."""
import pickle

import grain
import numpy as np
import pytest

from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.sources import DataError


def test_deterministic_given_seed_split_index():
  a, b = Phantoms("train", seed=3), Phantoms("train", seed=3)
  for i in (0, 1, 2, 100):
    for key in ("image", "mask", "label"):
      np.testing.assert_array_equal(a[i][key], b[i][key])
  other_seed, other_split = Phantoms("train", seed=4), Phantoms("val", seed=3)
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])
  assert not np.array_equal(a[0]["image"], other_split[0]["image"])
  assert not np.array_equal(a[0]["image"], a[3]["image"])  # same label, new sample
  clone = pickle.loads(pickle.dumps(a))
  np.testing.assert_array_equal(clone[5]["image"], a[5]["image"])


@pytest.mark.parametrize("size,channels", [(64, 1), (48, 3)])
def test_shapes_and_dtypes(size, channels):
  src = Phantoms("test", image_size=size, channels=channels, num_classes=4)
  assert len(src) == 256
  assert src.info.has_mask and src.info.num_mask_classes == 4 and src.info.channels == channels
  r = src[1]
  assert r["image"].shape == (size, size, channels) and r["image"].dtype == np.uint8
  assert r["mask"].shape == (size, size) and r["mask"].dtype == np.uint8
  assert r["label"].dtype == np.int32 and r["index"].dtype == np.int64
  if channels == 3:
    np.testing.assert_array_equal(r["image"][..., 0], r["image"][..., 2])


def test_balanced_labels_and_masks():
  src = Phantoms("train", num_examples=60, num_classes=5)
  records = [src[i] for i in range(len(src))]
  labels = np.array([r["label"] for r in records])
  assert np.bincount(labels).tolist() == [12] * 5
  np.testing.assert_array_equal(src.labels, labels)
  for r in records:
    ids = set(np.unique(r["mask"]).tolist())
    if r["label"] == 0:
      assert ids == {0}
    else:
      assert ids == {0, int(r["label"])}


def test_lesions_are_visible():
  src = Phantoms("val", num_examples=40, num_classes=4)
  for i in range(len(src)):
    r = src[i]
    if r["label"] == 0:
      continue
    img, fg = r["image"][..., 0].astype(np.float32), r["mask"] > 0
    ring = np.zeros_like(fg)
    ys, xs = np.nonzero(fg)
    ring[max(ys.min() - 4, 0):ys.max() + 5, max(xs.min() - 4, 0):xs.max() + 5] = True
    ring &= ~fg
    contrast = img[fg].max() - np.median(img[ring])
    assert contrast > 40, (i, int(r["label"]), contrast)  # a bright lesion on 0..255


def test_grain_pipeline_and_bad_args():
  ds = grain.MapDataset.source(Phantoms("val", num_examples=12)).shuffle(seed=1).batch(4)
  batch = next(iter(ds))
  assert batch["image"].shape == (4, 64, 64, 1) and batch["mask"].shape == (4, 64, 64)
  with pytest.raises(DataError, match="num_classes"):
    Phantoms("train", num_classes=9)
  assert len(Phantoms("val", num_examples={"val": 7})) == 7
