"""Readers on the real data sets, bad inputs, pickling and the registry."""
import logging
import pickle

import grain
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from medrep_jax.data import registry
from medrep_jax.data.dicom import DicomFolder
from medrep_jax.data.readers import ImageFolder, ImageMaskFolder, MedMNIST
from medrep_jax.data.sources import DataError


def _png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _grey(h=8, w=8, value=100):
  return np.full((h, w), value, np.uint8)


# ---------------------------------------------------------------- real data


def test_kermany_split_is_disjoint_and_deterministic(data_dir):
  root = data_dir / "kermany_chest_xray_224"
  splits = {s: ImageFolder(root, s) for s in ("train", "val", "test")}
  again = ImageFolder(root, "val")
  assert again.paths == splits["val"].paths
  sets = {s: set(src.paths) for s, src in splits.items()}
  assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
  assert not sets["val"] & sets["test"]
  assert sum(len(v) for v in sets.values()) == 5216
  assert abs(len(sets["val"]) - 522) <= 2 and abs(len(sets["test"]) - 522) <= 2
  for src in splits.values():
    assert src.info.num_classes == 2
    assert src.info.class_names == ("NORMAL", "PNEUMONIA")
    assert set(np.unique(src.labels)) == {0, 1}  # stratified: both classes everywhere
  r = splits["val"][0]
  assert r["image"].shape == (224, 224, 3) and r["image"].dtype == np.uint8
  assert r["label"].dtype == np.int32 and r["index"] == 0
  grey = ImageFolder(root, "test", channels=1)
  assert grey[5]["image"].shape == (224, 224, 1) and grey.info.channels == 1
  other_seed = ImageFolder(root, "val", seed=1)
  assert other_seed.paths != splits["val"].paths


def test_kvasir_pairs_binary_masks(data_dir):
  src = ImageMaskFolder(data_dir / "kvasir_seg_256", "val", mask_threshold=127)
  assert len(src) == 100 and src.info.has_mask and src.info.num_mask_classes == 2
  for i in (0, 7, 50):
    r = src[i]
    assert r["image"].shape == (256, 256, 3) and r["image"].dtype == np.uint8
    assert r["mask"].shape == (256, 256) and r["mask"].dtype == np.uint8
    assert set(np.unique(r["mask"])) == {0, 1}
    assert src.image_paths[i].stem == src.mask_paths[i].stem
    assert "label" not in r
  total = sum(len(ImageMaskFolder(data_dir / "kvasir_seg_256", s))
              for s in ("train", "val", "test"))
  assert total == 998


def test_busi_classes_and_label_masks(data_dir):
  src = ImageMaskFolder(data_dir / "busi_256", "all", mask_dir="mask", mask_suffix="_mask",
                        classes=("normal", "benign", "malignant"), mask_from_label=True)
  assert len(src) == 780 and src.info.num_classes == 3 and src.info.num_mask_classes == 3
  counts = np.bincount(src.labels)
  assert counts.tolist() == [133, 437, 210]
  for i in (0, 200, 700):
    r = src[i]
    assert set(np.unique(r["mask"])) <= {0, int(r["label"])}
    assert r["mask"].shape == r["image"].shape[:2]


def test_pneumoniamnist(data_dir):
  path = data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
  lengths = {s: len(MedMNIST(path, s)) for s in ("train", "val", "test")}
  assert lengths == {"train": 3882, "val": 524, "test": 624}
  src = MedMNIST(path, "train")
  assert src.info.num_classes == 2 and not src.info.multi_label and src.info.channels == 1
  r = src[10]
  assert r["image"].shape == (28, 28, 1) and r["image"].dtype == np.uint8
  assert r["label"].dtype == np.int32 and r["label"] in (0, 1)
  assert np.bincount(src.labels).tolist() == [388, 3494]
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[10]["image"], r["image"])


def test_retinamnist(data_dir):
  src = MedMNIST(data_dir / "retinamnist" / "retinamnist.npz", "test")
  assert len(src) == 400 and src.info.num_classes == 5 and src.info.channels == 3
  assert src[0]["image"].shape == (28, 28, 3)
  assert src.labels.min() >= 0 and src.labels.max() <= 4


def test_covid_ct_dicom_hu(data_dir):
  root = data_dir / "ct_covid19_ny_sbu_dicom"
  src = DicomFolder(root, "all")
  assert len(src) == 62 and src.info.image_dtype == "float32" and src.info.channels == 1
  axial = [i for i, (p, _) in enumerate(src.elements) if p.parent.name == "axial"]
  for i in axial[:4]:
    hu = src[i]["image"]
    assert hu.dtype == np.float32 and hu.ndim == 3 and hu.shape[-1] == 1
    assert -3100 < hu.min() <= -1000  # air / outside the field of view
    assert hu.max() > 300  # bone
    assert -1100 < np.median(hu) < 200
    assert (hu < -500).mean() > 0.1  # air and lungs are strongly negative
  patients = {s: {p.relative_to(root).parts[0] for p, _ in DicomFolder(root, s).elements}
              for s in ("train", "val", "test")}
  assert not patients["train"] & patients["val"] and not patients["val"] & patients["test"]
  assert not patients["train"] & patients["test"]
  unit = DicomFolder(root, "all", window=(-600, 1500), output="unit")[axial[0]]["image"]
  assert unit.min() >= 0 and unit.max() <= 1 and unit.max() > 0.5


# ------------------------------------------------------------- synthetic data


def test_dicom_rescale_and_window(tmp_path):
  ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
  raw = ds.pixel_array.astype(np.float32)
  ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
  (tmp_path / "p1").mkdir()
  ds.save_as(tmp_path / "p1" / "a.dcm")
  src = DicomFolder(tmp_path, "all")
  np.testing.assert_array_equal(src[0]["image"][..., 0], raw * 2 - 1000)
  win = DicomFolder(tmp_path, "all", window=(0, 400), output="unit")[0]["image"][..., 0]
  np.testing.assert_allclose(win, np.clip(raw * 2 - 1000, -200, 200) / 400 + 0.5, atol=1e-6)
  (tmp_path / "p1" / "bad.dcm").write_bytes(b"not a dicom at all" * 10)
  with pytest.raises(DataError, match="bad.dcm"):
    DicomFolder(tmp_path, "all")[1]
  with pytest.raises(DataError, match="needs window"):
    DicomFolder(tmp_path, "all", output="unit")


def _class_tree(root, n=4):
  for c, value in (("cats", 50), ("dogs", 200)):
    for i in range(n):
      _png(root / c / f"{c}{i}.png", _grey(value=value))


def test_image_folder_corrupt_file(tmp_path, caplog):
  _class_tree(tmp_path)
  bad = tmp_path / "cats" / "cats1b.jpg"
  bad.write_bytes(np.random.default_rng(0).bytes(300))
  src = ImageFolder(tmp_path, "all")
  i = src.paths.index(bad)
  with pytest.raises(DataError, match="cats1b.jpg"):
    src[i]
  skip = ImageFolder(tmp_path, "all", skip_corrupt=True)
  with caplog.at_level(logging.WARNING):
    r = skip[i]
    skip[i]
  assert r["index"] == i + 1 and skip.num_skipped == 1
  assert sum("cats1b.jpg" in m for m in caplog.messages) == 1
  assert [int(skip[j]["index"]) for j in range(len(skip))].count(i) == 0


def test_image_folder_layout_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    ImageFolder(tmp_path / "nowhere", "train")
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(DataError, match=r"(?s)no images.*empty.*Expected layout"):
    ImageFolder(tmp_path / "empty", "train")
  _class_tree(tmp_path / "two")
  with pytest.raises(DataError, match="num_classes=1"):
    ImageFolder(tmp_path / "two", "train", num_classes=1)
  with pytest.raises(DataError, match="unknown split"):
    ImageFolder(tmp_path / "two", "training")


def test_image_folder_split_folders(tmp_path):
  _class_tree(tmp_path / "train", n=10)
  _class_tree(tmp_path / "test", n=2)
  test = ImageFolder(tmp_path, "test")
  assert len(test) == 4 and all("test" in p.parts for p in test.paths)
  train, val = ImageFolder(tmp_path, "train"), ImageFolder(tmp_path, "val", val_fraction=0.2)
  assert len(val) == 4 and len(train) == 18  # test fraction unused: test/ exists
  assert len(ImageFolder(tmp_path, "train", val_fraction=0.2)) == 16


def _seg_tree(root, n=3, mask_ext=".png"):
  for i in range(n):
    _png(root / "images" / f"im{i}.jpg", np.full((8, 8, 3), 120, np.uint8))
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 255
    _png(root / "masks" / f"im{i}{mask_ext}", m)


def test_image_mask_folder_errors(tmp_path):
  _seg_tree(tmp_path)
  src = ImageMaskFolder(tmp_path, "all")
  assert np.unique(src[0]["mask"]).tolist() == [0, 1] and src[0]["mask"].sum() == 9
  _png(tmp_path / "masks" / "im1.png", np.zeros((6, 7), np.uint8))
  with pytest.raises(DataError, match=r"im1\.png.*\(6, 7\).*im1\.jpg.*\(8, 8\)"):
    ImageMaskFolder(tmp_path, "all")[1]
  assert ImageMaskFolder(tmp_path, "all", resize_masks=True)[1]["mask"].shape == (8, 8)
  _png(tmp_path / "images" / "lonely.png", _grey())
  with pytest.raises(DataError, match="lonely.png has no mask"):
    ImageMaskFolder(tmp_path, "all")
  skipping = ImageMaskFolder(tmp_path, "all", skip_corrupt=True)
  assert len(skipping) == 3 and skipping.num_skipped == 1


def test_image_mask_folder_values_and_labels(tmp_path):
  _png(tmp_path / "images" / "a.png", _grey(4, 4))
  _png(tmp_path / "images" / "b.png", _grey(4, 4))
  _png(tmp_path / "masks" / "a_mask.png",
       np.array([[0, 128, 255, 250]] * 4, np.uint8))
  _png(tmp_path / "masks" / "b_mask.png", np.zeros((4, 4), np.uint8))
  src = ImageMaskFolder(tmp_path, "all", mask_suffix="_mask", mask_threshold=None,
                        mask_values=(0, 128, 255), labels_from_mask=True)
  assert src.info.num_mask_classes == 3 and src.info.num_classes == 2
  np.testing.assert_array_equal(src[0]["mask"][0], [0, 1, 2, 2])
  assert src[0]["label"] == 1 and src[1]["label"] == 0
  raw = ImageMaskFolder(tmp_path, "all", mask_suffix="_mask", mask_threshold=None,
                        num_mask_classes=3)
  with pytest.raises(DataError, match="a_mask.png has id 255"):
    raw[0]


def test_medmnist_bad_files(tmp_path):
  path = tmp_path / "m.npz"
  np.savez(path, train_images=np.zeros((4, 5, 5), np.uint8),
           val_images=np.zeros((2, 5, 5), np.uint8))
  with pytest.raises(DataError, match=r"train_labels.*keys present.*train_images"):
    MedMNIST(path, "train")
  np.savez(path, train_images=np.zeros((4, 5, 5), np.uint8),
           train_labels=np.array([[0], [1], [3], [2]]))
  with pytest.raises(DataError, match=r"train_labels\[2\].*num_classes=3"):
    MedMNIST(path, "train", num_classes=3)
  assert MedMNIST(path, "train").info.num_classes == 4
  np.savez(path, train_images=np.zeros((3, 5, 5, 3), np.uint8),
           train_labels=np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0]]))
  multi = MedMNIST(path, "train")
  assert multi.info.multi_label and multi.info.num_classes == 3
  np.testing.assert_array_equal(multi[0]["label"], np.array([0, 1, 1], np.float32))
  assert multi[0]["label"].dtype == np.float32
  with pytest.raises(DataError, match="does not exist"):
    MedMNIST(tmp_path / "missing.npz", "train")


def test_sources_work_with_grain(tmp_path):
  _class_tree(tmp_path)
  src = ImageFolder(tmp_path, "all")
  clone = pickle.loads(pickle.dumps(src))
  ds = grain.MapDataset.source(clone).shuffle(seed=0)
  labels = sorted(int(r["label"]) for r in ds)
  assert labels == [0] * 4 + [1] * 4
  with pytest.raises(IndexError):
    src[len(src)]
  assert src[-1]["index"] == len(src) - 1


# ------------------------------------------------------------------ registry


def test_registry_presets(data_dir, monkeypatch):
  monkeypatch.setenv("MEDREP_DATA_DIR", str(data_dir))
  cfg = registry.data_config("pneumoniamnist")
  cfg.lock()
  assert len(registry.get_source(cfg, "val")) == 524
  cfg = registry.data_config("kvasir_seg", val_fraction=0.2)
  assert len(registry.get_source(cfg, "val")) == 200
  ct = registry.get_source(registry.data_config("covid_ct"), "train")
  assert ct[0]["image"].min() >= -1350 and ct[0]["image"].max() <= 150  # lung window
  monkeypatch.delenv("MEDREP_DATA_DIR")
  with pytest.raises(DataError, match="MEDREP_DATA_DIR"):
    registry.get_source(registry.data_config("kermany"), "train")


def test_registry_config_fields_and_errors(tmp_path):
  for name in registry.PRESETS:
    cfg = registry.data_config(name)
    assert set(cfg.keys()) == set(registry.DEFAULTS) and cfg.name == name
  cfg = registry.data_config("phantoms", num_examples=8, image_size=32)
  src = registry.get_source(cfg, "train")
  assert len(src) == 8 and src[0]["image"].shape == (32, 32, 1)
  with pytest.raises(DataError, match=r"Did you mean \['kvasir_seg'"):
    registry.data_config("kvasir-seg")
  with pytest.raises(DataError, match="unknown data fields"):
    registry.data_config("phantoms", imagesize=3)
  _class_tree(tmp_path)
  folder = registry.get_source(registry.data_config("image_folder", root=str(tmp_path)), "all")
  assert folder.info.num_classes == 2 and folder[0]["image"].shape == (8, 8, 1)
