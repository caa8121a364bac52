"""TFDS builders: array_record round trips without TensorFlow."""
import dataclasses
import pickle
import shutil
import sys

import grain
import numpy as np
import pydicom.data
import pytest

from medrep_jax.data import tfds_builders as tb
from medrep_jax.data.dicom import DicomFolder
from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.readers import ImageMaskFolder
from medrep_jax.data.sources import DataError


def _assert_same(a, b):
  assert set(a) == set(b)
  for key in b:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_phantoms_round_trip(tmp_path):
  sources = {"train": Phantoms("train", num_examples=16, num_classes=4),
             "val": Phantoms("val", num_examples=6, num_classes=4)}
  path = tb.build_from_source(sources, "phantoms_tiny", tmp_path)
  assert (path / "dataset_info.json").is_file()
  assert list(path.glob("*.array_record*"))
  for split, src in sources.items():
    back = tb.TfdsSource("phantoms_tiny", split, data_dir=tmp_path)
    assert len(back) == len(src)
    assert back.info == dataclasses.replace(src.info, name="phantoms_tiny")
    for i in range(len(src)):
      _assert_same(back[i], src[i])
  clone = pickle.loads(pickle.dumps(back))
  _assert_same(clone[2], sources["val"][2])
  batch = next(iter(grain.MapDataset.source(clone).batch(3)))
  assert batch["image"].shape == (3, 64, 64, 1)
  assert "tensorflow" not in sys.modules
  with pytest.raises(DataError, match=r"no split 'test'.*\['train', 'val'\]"):
    tb.TfdsSource("phantoms_tiny", "test", data_dir=tmp_path)
  with pytest.raises(DataError, match="no prepared TFDS dataset 'nothing'"):
    tb.TfdsSource("nothing", "train", data_dir=tmp_path)
  capped = tb.build_from_source(sources, "phantoms_capped", tmp_path, max_examples_per_split=4)
  assert len(tb.TfdsSource(str(capped), "train")) == 4


def test_float32_ct_round_trip(tmp_path):
  (tmp_path / "ct" / "p").mkdir(parents=True)
  shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), tmp_path / "ct" / "p" / "a.dcm")
  src = DicomFolder(tmp_path / "ct", "all")
  tb.build_from_source({"train": src}, "ct_tiny", tmp_path / "tfds")
  back = tb.TfdsSource("ct_tiny", "train", data_dir=tmp_path / "tfds")
  assert back.info.image_dtype == "float32"
  _assert_same(back[0], src[0])


def test_manual_builder_missing_folder_shows_layout(tmp_path):
  with pytest.raises(DataError, match=r"(?s)missing.*images/\*\.jpg.*masks/\*\.jpg"):
    tb.prepare_manual("medrep_kvasir_seg", tmp_path / "tfds", manual_dir=tmp_path / "absent")
  (tmp_path / "wrong" / "stuff").mkdir(parents=True)
  with pytest.raises(DataError, match=r"(?s)does not contain.*ISIC2018_Task1_Training_GroundTruth"):
    tb.prepare_manual("medrep_isic2018", tmp_path / "tfds", manual_dir=tmp_path / "wrong")
  with pytest.raises(DataError, match="unknown manual builder"):
    tb.prepare_manual("kvasir", tmp_path / "tfds")


def test_kvasir_manual_builder_on_a_tiny_copy(data_dir, tmp_path):
  real = data_dir / "kvasir_seg_256"
  manual = tmp_path / "manual" / "Kvasir-SEG"
  for sub in ("images", "masks"):
    (manual / sub).mkdir(parents=True)
  for p in sorted((real / "images").glob("*.jpg"))[:10]:
    shutil.copy(p, manual / "images" / p.name)
    shutil.copy(real / "masks" / p.name, manual / "masks" / p.name)
  tb.prepare_manual("medrep_kvasir_seg", tmp_path / "tfds", manual_dir=tmp_path / "manual",
                    config="max256")
  total = 0
  for split in ("train", "val", "test"):
    back = tb.TfdsSource("medrep_kvasir_seg", split, data_dir=tmp_path / "tfds")
    ref = ImageMaskFolder(manual.parent / "Kvasir-SEG", split, channels=3)
    assert len(back) == len(ref) > 0 and back.info.has_mask
    total += len(back)
    for i in range(len(back)):
      _assert_same(back[i], ref[i])
      assert set(np.unique(back[i]["mask"])) <= {0, 1}
  assert total == 10


def test_isic_layout_with_own_validation(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  manual = tmp_path / "manual"
  for part, n in (("Training", 5), ("Validation", 2)):
    (manual / f"ISIC2018_Task1-2_{part}_Input").mkdir(parents=True)
    (manual / f"ISIC2018_Task1_{part}_GroundTruth").mkdir(parents=True)
    for i in range(n):
      name = f"ISIC_{part[0]}{i:06d}"
      Image.fromarray(np.full((300, 200, 3), 90, np.uint8)).save(
          manual / f"ISIC2018_Task1-2_{part}_Input" / f"{name}.jpg")
      mask = np.zeros((300, 200), np.uint8)
      mask[50:100, 50:150] = 255
      Image.fromarray(mask).save(manual / f"ISIC2018_Task1_{part}_GroundTruth" /
                                 f"{name}_segmentation.png")
  tb.prepare_manual("medrep_isic2018", tmp_path / "tfds", manual_dir=manual, config="max256",
                    test_fraction=0.2)
  sizes = {s: len(tb.TfdsSource("medrep_isic2018", s, data_dir=tmp_path / "tfds"))
           for s in ("train", "val", "test")}
  assert sizes == {"train": 4, "val": 2, "test": 1}
  r = tb.TfdsSource("medrep_isic2018", "val", data_dir=tmp_path / "tfds")[0]
  assert r["image"].shape == (256, 171, 3) and r["mask"].shape == (256, 171)  # max256 config
  assert set(np.unique(r["mask"])) == {0, 1} and 3000 < r["mask"].sum() < 4300
