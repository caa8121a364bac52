"""Whole volumes for 3-D methods: DICOM series, volume files, 3-D phantoms, 3-D fixed crops
and the three-view figure (CAMContrast Sec. 4.7)."""
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest

from medrep_jax.data import dicom_series, imageio, loader, registry, transforms, volumes
from medrep_jax.data.phantoms import Phantoms3D
from medrep_jax.data.sources import DataError
from medrep_jax.eval import figures
from medrep_jax.methods.camcontrast_parts import crops


def _dicom(path, pixels, *, z=None, instance=None, series="1.2.3", slope=1.0, intercept=0.0):
  """One CT slice holding `pixels` (int16), built from pydicom's CT test file."""
  ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
  pixels = np.asarray(pixels, np.int16)
  ds.Rows, ds.Columns = pixels.shape
  ds.PixelData = pixels.tobytes()
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  ds.SeriesInstanceUID = series
  ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
  if z is None:
    del ds.ImagePositionPatient
  else:
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
  if instance is None:
    del ds.InstanceNumber
  else:
    ds.InstanceNumber = instance
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path)


def _series(folder, zs, *, shape=(6, 5), series="1.2.3"):
  """Slices named in file order a, b, c... at positions `zs`; slice at z holds 10 * z + 1
  stored, with slope 2 and intercept -z (so HU = 20 z + 2 - z)."""
  for k, z in enumerate(zs):
    _dicom(folder / f"{chr(97 + k)}.dcm", np.full(shape, 10 * z + 1), z=z, instance=len(zs) - k,
           series=series, slope=2.0, intercept=-float(z))


def _source(root, split="all", **fields):
  return registry.get_source(registry.data_config("volume_folder", root=str(root), **fields),
                             split)


# ------------------------------------------------------------------ DICOM series


def test_dicom_series_orders_slices_and_rescales_each(tmp_path):
  _series(tmp_path / "s", [3, 0, 2, 1])  # file order is not slice order
  vol = dicom_series.read_series(
      [dicom_series.read_header(p) for p in sorted((tmp_path / "s").glob("*.dcm"))],
      tmp_path / "s")
  z = np.arange(4, dtype=np.float32)
  assert vol.array.shape == (4, 6, 5) and vol.array.dtype == np.float32
  np.testing.assert_array_equal(vol.array[:, 0, 0], (10 * z + 1) * 2 - z)
  assert vol.spacing[0] == 1.0
  # Without positions, InstanceNumber orders them (here: reversed file order).
  for k, z in enumerate([5, 6, 7]):
    _dicom(tmp_path / "n" / f"{chr(97 + k)}.dcm", np.full((4, 4), z), instance=3 - k)
  headers = [dicom_series.read_header(p) for p in sorted((tmp_path / "n").glob("*.dcm"))]
  np.testing.assert_array_equal(dicom_series.read_series(headers, "n").array[:, 0, 0], [7, 6, 5])


def test_dicom_series_cases_in_class_folders(tmp_path):
  _series(tmp_path / "normal" / "p1", [0, 1, 2])
  _series(tmp_path / "abnormal" / "p2" / "nested", [5, 6])
  src = _source(tmp_path, volume_size=(3, 6, 5), volume_norm="none")
  assert src.info.class_names == ("abnormal", "normal") and src.info.channels == 1
  got = {src.catalog.items[i].path: src[i] for i in range(len(src))}
  np.testing.assert_array_equal(got["normal/p1"]["image"][:, 0, 0, 0], [2, 21, 40])
  assert got["normal/p1"]["label"] == 1 and got["abnormal/p2"]["label"] == 0
  # Resized along depth: 2 slices -> 3 keeps the ends' order.
  deep = got["abnormal/p2"]["image"][:, 0, 0, 0]
  assert deep.shape == (3,) and deep[0] < deep[1] < deep[2]


def test_several_series_in_one_folder(tmp_path):
  _series(tmp_path / "c" / "p1", [0, 1], series="1.1")
  _series(tmp_path / "c" / "p1" / "other", [0, 1, 2], series="1.2", shape=(4, 4))
  with pytest.raises(DataError, match=r"(?s)p1 holds 2 DICOM series.*1\.1.*dicom_series"):
    _source(tmp_path, volume_size=(2, 4, 4))[0]
  split = _source(tmp_path, volume_size=(2, 4, 4), dicom_series="split")
  assert len(split) == 2 and [it.sub for it in split.catalog.items] == [0, 1]
  assert split.groups == ["c/p1", "c/p1"]  # one case folder: one group
  with pytest.raises(DataError, match=r"other/a\.dcm is 4x4 but .*a\.dcm is 6x5"):
    _source(tmp_path, volume_size=(2, 4, 4), dicom_series="stack")[0]


# ------------------------------------------------------------------ volume files


def _volume_tree(root, n=5):
  rng = np.random.default_rng(0)
  for cls, offset in (("normal", 0.0), ("abnormal", 100.0)):
    for k in range(n):
      vol = rng.normal(offset, 1, size=(6 + k, 10, 9)).astype(np.float32)
      (root / cls).mkdir(parents=True, exist_ok=True)
      if k % 2:
        nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)).to_filename(root / cls / f"c{k}.nii.gz")
      else:
        np.save(root / cls / f"c{k}.npy", vol)


def test_volume_files_shapes_labels_splits(tmp_path):
  _volume_tree(tmp_path)
  fields = dict(volume_size=(4, 8, 6), val_fraction=0.2, test_fraction=0.2, seed=3)
  parts = {s: _source(tmp_path, s, **fields) for s in ("train", "val", "test")}
  assert {s: len(p) for s, p in parts.items()} == {"train": 6, "val": 2, "test": 2}
  paths = [it.path for p in parts.values() for it in p.catalog.items]
  assert len(set(paths)) == 10  # disjoint and complete
  for p in parts.values():
    assert np.bincount(p.labels).tolist() == [len(p) // 2] * 2  # stratified by class
    rec = p[0]
    assert rec["image"].shape == (4, 8, 6, 1) and rec["image"].dtype == np.float32
    assert 0 <= rec["image"].min() and rec["image"].max() <= 1
    assert rec["label"] == p.catalog.class_names.index(p.catalog.items[0].path.split("/")[0])
  again = _source(tmp_path, "val", **fields)
  assert [it.path for it in again.catalog.items] == [it.path for it in parts["val"].catalog.items]
  other = [tuple(it.path for it in _source(tmp_path, "val", **{**fields, "seed": s}).catalog.items)
           for s in range(6)]
  assert len(set(other)) > 1  # the seed moves the carve
  # k-fold by case: every case is in exactly one val fold.
  folds = [_source(tmp_path, "val", volume_size=(4, 8, 6), num_folds=4, fold=f, test_fraction=0)
           for f in range(4)]
  assert sorted(it.path for f in folds for it in f.catalog.items) == sorted(paths)


def test_nifti_axes_and_normalization(tmp_path):
  zyx = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
  (tmp_path / "a").mkdir()
  nib.Nifti1Image(zyx.transpose(2, 1, 0), np.eye(4)).to_filename(tmp_path / "a" / "v.nii")
  got = _source(tmp_path, volume_size=(3, 4, 5), volume_norm="minmax")[0]["image"][..., 0]
  np.testing.assert_allclose(got, zyx / zyx.max(), atol=1e-6)
  hu = np.linspace(-1200, 400, 60, dtype=np.float32).reshape(3, 4, 5, 1)
  win = volumes.normalize_volume(hu, "auto", window=(-600, 1500))
  np.testing.assert_allclose(win, np.clip((hu + 1350) / 1500, 0, 1), atol=1e-6)
  pct = volumes.normalize_volume(hu, "auto", percentiles=(10, 90))
  lo, hi = np.percentile(hu, (10, 90))
  np.testing.assert_allclose(pct, np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)
  assert volumes.normalize_volume(np.ones((2, 2, 2, 1)), "percentile").max() == 0


def test_resize_volume_is_the_bilinear_resize_generalized():
  rng = np.random.default_rng(1)
  vol = rng.random((3, 37, 29, 2)).astype(np.float32)
  for hw in ((16, 12), (50, 40), (37, 29)):
    want = np.stack([imageio.resize_image(s, hw) for s in vol])
    np.testing.assert_allclose(volumes.resize_volume(vol, (3,) + hw), want, atol=2e-5)
  ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4))
  down = volumes.resize_volume(ramp, (5, 4, 4))[:, 0, 0]
  np.testing.assert_allclose(down[1:4], [2.5, 4.5, 6.5], atol=1e-5)  # a ramp stays a ramp
  assert np.all(np.diff(down) > 0)
  up = volumes.resize_volume(ramp[:2], (4, 4, 4))[:, 0, 0]
  np.testing.assert_allclose(up, [0, 0.25, 0.75, 1], atol=1e-6)  # half-pixel centres


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(DataError, match="missing.*does not exist"):
    _source(tmp_path / "missing")
  _volume_tree(tmp_path / "d", n=2)
  (tmp_path / "d" / "normal" / "broken.npy").write_bytes(b"not an array")
  src = _source(tmp_path / "d", volume_size=(4, 4, 4))
  bad = [it.path for it in src.catalog.items].index("normal/broken.npy")
  with pytest.raises(DataError, match="broken.npy"):
    src[bad]
  lenient = _source(tmp_path / "d", volume_size=(4, 4, 4), skip_corrupt=True)
  assert lenient[bad]["index"] != bad and lenient.num_skipped == 1
  (tmp_path / "d" / "empty_class").mkdir()
  with pytest.raises(DataError, match="class folder .*empty_class holds no volumes"):
    _source(tmp_path / "d")
  _series(tmp_path / "e" / "a" / "p", [0, 1, 2])
  (tmp_path / "e" / "a" / "p" / "b.dcm").write_bytes(b"garbage" * 40)
  with pytest.raises(DataError, match=r"p/b\.dcm"):
    _source(tmp_path / "e", volume_size=(3, 4, 4))[0]
  (tmp_path / "f" / "a" / "p").mkdir(parents=True)
  with pytest.raises(DataError, match="class folder .*f/a holds no volumes"):
    _source(tmp_path / "f")
  with pytest.raises(DataError, match="no cases under .*a/p: a case folder without .dcm"):
    _source(tmp_path / "f", images="*/*")


def test_volume_transforms_and_batches():
  cfg = registry.data_config("phantoms3d", num_examples=4, volume_size=(8, 12, 10))
  src = registry.get_source(cfg, "train")
  pipeline = transforms.build_transforms(cfg)
  assert isinstance(pipeline[-1], transforms.CheckVolume)
  batch = next(iter(loader.eval_batches(src, pipeline, global_batch=4, process_index=0,
                                        process_count=1)))
  assert batch["image"].shape == (4, 8, 12, 10, 1) and batch["mask"].shape == (4, 8, 12, 10)
  with pytest.raises(DataError, match="volume shape"):
    transforms.CheckVolume((8, 12, 11)).map(src[0])
  assert isinstance(transforms.build_transforms(registry.data_config("phantoms"))[-1],
                    transforms.CheckShapes)  # 2-D configs keep the 2-D pipeline


# ------------------------------------------------------------------ 3-D phantoms


def test_phantoms3d_labels_and_lesions():
  src = Phantoms3D("train", num_examples=12, volume_size=(24, 28, 24), seed=5)
  np.testing.assert_array_equal(src.labels, np.arange(12) % 2)
  centroids = []
  for i in range(12):
    r = src[i]
    assert r["image"].shape == (24, 28, 24, 1) and r["label"] == i % 2
    assert 0 <= r["image"].min() and r["image"].max() <= 1
    if i % 2 == 0:
      assert not r["mask"].any()
      continue
    lesion = r["mask"].astype(bool)
    assert lesion.sum() >= 8
    # Lesions sit inside the organ, away from the border, and change its intensity.
    zz, yy, xx = np.nonzero(lesion)
    assert min(zz.min(), yy.min(), xx.min()) > 0 and zz.max() < 23 and yy.max() < 27
    assert np.abs(r["image"][lesion, 0] - 0.5).mean() > 0.15
    centroids.append(np.argwhere(lesion).mean(0))
  assert np.ptp(np.array(centroids), axis=0).max() > 3  # random positions
  np.testing.assert_array_equal(src[3]["image"], src[3]["image"])
  other = registry.get_source(registry.data_config("phantoms3d", num_examples=4), "val")
  assert other.info.class_names == ("normal", "abnormal") and other[1]["mask"].any()
  with pytest.raises(DataError, match="volume_size"):
    Phantoms3D(volume_size=(4, 32, 32))


# ------------------------------------------------------------------ 3-D crops


def test_ten_crop_boxes_cover_the_volume():
  d, h, w = 4, 6, 8
  boxes = crops.crop_boxes((d, h, w), "ten")
  assert len(boxes) == 10 and crops.positions("ten")[8:] == ("D0-C", "D1-C")
  cover = np.zeros((d, h, w), np.int32)
  for z, y, x, bd, bh, bw in boxes:
    assert (bd, bh, bw) == (d // 2, h // 2, w // 2)
  for z, y, x, bd, bh, bw in boxes[:8]:
    cover[z:z + bd, y:y + bh, x:x + bw] += 1
  np.testing.assert_array_equal(cover, 1)  # the 8 octants tile the volume once
  assert [b[:3] for b in boxes[8:]] == [(0, 1, 2), (2, 1, 2)]  # centred in-plane, per half
  assert crops.crop_boxes((d, h, w), "nine")[-1][:3] == (1, 1, 2)  # centred on all axes
  assert len(crops.crop_boxes((d, h, w), "eight")) == 8
  with pytest.raises(ValueError, match="cuts 3-D heatmaps"):
    crops.crop_boxes((6, 8), "ten")
  with pytest.raises(ValueError, match="must be even"):
    crops.crop_boxes((5, 6, 8), "ten")


def test_ten_crops_keep_images_and_heatmaps_aligned():
  rng = np.random.default_rng(0)
  n, grid, s = 2, (4, 6, 4), 2
  images = rng.random((n,) + tuple(g * s for g in grid) + (1,)).astype(np.float32)
  heat = images[..., 0].reshape(n, 4, s, 6, s, 4, s).mean((2, 4, 6))
  out = crops.fixed_crops(images, heat, "ten")
  assert out["image"].shape == (n * 10, 4, 6, 4, 1) and out["heatmap"].shape == (n * 10, 2, 3, 2, 1)
  np.testing.assert_array_equal(out["position"], np.tile(np.arange(10), n))
  blocks = out["image"][..., 0].reshape(n * 10, 2, s, 3, s, 2, s).mean((2, 4, 6))
  np.testing.assert_allclose(blocks, out["heatmap"][..., 0], rtol=1e-5)
  np.testing.assert_array_equal(out["image"][9], images[0, 4:8, 2:8, 2:6])  # D1 centre
  whole = crops.fixed_crops(images, heat, "none")
  assert whole["image"].shape == (n, 4, 6, 4, 1)
  with pytest.raises(ValueError, match="cuts 2-D heatmaps"):
    crops.fixed_crops(images, heat, "five")
  img, hm = crops.random_aligned_crops(jax.random.key(0), jnp.asarray(images),
                                       jnp.asarray(heat)[..., None], stride=s)
  assert img.shape == (n, 4, 6, 4, 1) and hm.shape == (n, 2, 3, 2, 1)
  got = np.asarray(img[..., 0]).reshape(n, 2, s, 3, s, 2, s).mean((2, 4, 6))
  np.testing.assert_allclose(got, hm[..., 0], rtol=1e-5)


# ------------------------------------------------------------------ figure and real CT


def test_three_view_figure_writes_a_png(tmp_path):
  src = Phantoms3D("train", num_examples=2, volume_size=(16, 16, 16))
  vols = np.stack([src[i]["image"] for i in range(2)])
  heat = np.stack([src[i]["mask"] for i in range(2)]).astype(np.float32)
  heat = heat.reshape(2, 4, 4, 4, 4, 4, 4).mean((2, 4, 6))
  path = figures.volume_views_figure(vols, heat, tmp_path / "f" / "views.png", at="peak")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert figures.volume_views_figure(vols[..., 0], None, tmp_path / "plain.png")


def test_shared_ct_as_volumes(data_dir, monkeypatch):
  monkeypatch.setenv("MEDREP_DATA_DIR", str(data_dir))
  cfg = registry.data_config("covid_ct_volume")
  parts = {s: registry.get_source(cfg, s) for s in ("train", "val", "test")}
  assert sum(len(p) for p in parts.values()) == 20  # 10 patients x 2 one-slice series
  groups = [set(p.groups) for p in parts.values()]
  assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
  rec = parts["val"][0]
  assert rec["image"].shape == (16, 32, 32, 1) and "label" not in rec
  assert rec["image"].min() == 0 and rec["image"].max() == 1  # lung window, air to bone
  np.testing.assert_allclose(rec["image"][0], rec["image"][-1])  # one slice, stretched
