"""The folder layouts real datasets come in, built small in tmp_path (issue 13)."""
import collections

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from medrep_jax.data import imageio, loader, registry, transforms
from medrep_jax.data.sources import DataError

INSPECT = "python -m medrep_jax.data inspect"


def _img(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _source(root, split="all", **fields):
  return registry.get_source(registry.data_config("folder", root=str(root), **fields), split)


def _square(h, w, top, left, size, value=255):
  m = np.zeros((h, w), np.uint8)
  m[top:top + size, left:left + size] = value
  return m


# ------------------------------------------------------------------ pairing rules


def test_nested_per_case_folders(tmp_path):
  for k in (17, 18, 19):
    case = f"case_{k:03d}"
    _img(tmp_path / case / "img" / f"{case}.bmp", np.full((8, 8), k, np.uint8))
    _img(tmp_path / case / "seg" / f"{case}_seg.bmp", _square(8, 8, 1, 1, k - 15))
  for rule in (dict(mask="{case}/seg/{stem}_seg.bmp"), dict(mask="{dir}/../seg/{stem}_seg.*")):
    src = _source(tmp_path, images="{case}/img/{stem}.bmp", **rule)
    assert len(src) == 3 and src.info.has_mask and src.info.num_mask_classes == 2
    pairs = [(it.path, it.masks) for it in src.catalog.items]
    assert pairs[0] == ("case_017/img/case_017.bmp", ("case_017/seg/case_017_seg.bmp",))
    for i, k in enumerate((17, 18, 19)):
      r = src[i]
      assert int(r["image"][0, 0, 0]) == k and int(r["mask"].sum()) == (k - 15) ** 2
  # With no mask rule the same folders are an image folder of every file.
  assert len(_source(tmp_path, images="**/*.bmp")) == 6


def _raters(root):
  """scan_0k.jpg with two rater masks beside it, and one image with no mask."""
  rng = np.random.default_rng(0)
  refs = {}
  for k in range(3):
    _img(root / f"scan_0{k}.jpg", np.full((6, 6, 3), 50 * k, np.uint8))
    ms = [(rng.random((6, 6)) > 0.5).astype(np.uint8) * 255 for _ in range(3)]
    for r, m in enumerate(ms, start=1):
      _img(root / f"scan_0{k}_rater{r}.png", m)
    refs[f"scan_0{k}.jpg"] = np.stack(ms) // 255
  _img(root / "lonely.jpg", np.zeros((6, 6, 3), np.uint8))
  return refs


def test_masks_beside_images_are_not_images_and_unpaired_are_reported(tmp_path):
  refs = _raters(tmp_path)
  with pytest.raises(DataError, match=rf"(?s)lonely.jpg has no mask.*data.unpaired.*{INSPECT}"):
    _source(tmp_path, images="*", mask="{dir}/{stem}_rater*.png")
  src = _source(tmp_path, images="*", mask="{dir}/{stem}_rater*.png", unpaired="skip")
  assert [it.path for it in src.catalog.items] == sorted(refs)
  assert [p for p, _ in src.skipped] == ["lonely.jpg"]
  assert "no mask: looked for lonely_rater*.png" in src.skipped[0][1]
  assert src.num_skipped == 1 and all(len(it.masks) == 3 for it in src.catalog.items)


@pytest.mark.parametrize("rule", ["union", "majority", "first", "stack"])
def test_multi_mask_rules_match_numpy(tmp_path, rule):
  refs = _raters(tmp_path)
  src = _source(tmp_path, images="*", mask="{dir}/{stem}_rater*.png", unpaired="skip",
                mask_combine=rule)
  for i, it in enumerate(src.catalog.items):
    stack = refs[it.path]
    want = {"union": stack.max(0), "majority": (stack.sum(0) >= 2).astype(np.uint8),
            "first": stack[0], "stack": stack.max(0)}[rule]
    r = src[i]
    np.testing.assert_array_equal(r["mask"], want)
    if rule == "stack":
      np.testing.assert_array_equal(r["masks"], stack)
  chosen = _source(tmp_path, images="*", mask="{dir}/{stem}_rater*.png", unpaired="skip",
                   mask_choose="rater2")
  np.testing.assert_array_equal(chosen[0]["mask"], refs["scan_00.jpg"][1])


def test_busi_style_one_or_two_masks_beside_the_image(tmp_path):
  a, b = _square(8, 8, 0, 0, 3), _square(8, 8, 5, 5, 3)
  _img(tmp_path / "benign" / "benign (1).png", np.full((8, 8), 9, np.uint8))
  _img(tmp_path / "benign" / "benign (1)_mask.png", a)
  _img(tmp_path / "benign" / "benign (1)_mask_1.png", b)
  _img(tmp_path / "benign" / "benign (10).png", np.full((8, 8), 9, np.uint8))
  _img(tmp_path / "benign" / "benign (10)_mask.png", b)
  _img(tmp_path / "normal" / "normal (1).png", np.full((8, 8), 9, np.uint8))
  _img(tmp_path / "normal" / "normal (1)_mask.png", np.zeros((8, 8), np.uint8))
  src = _source(tmp_path, images="{class}/{stem}.png", mask="{class}/{stem}_mask*.png",
                class_names=("normal", "benign"), mask_from_label=True)
  assert src.info.num_classes == 2 and src.info.num_mask_classes == 2
  got = {it.path: it.masks for it in src.catalog.items}
  assert got["benign/benign (1).png"] == ("benign/benign (1)_mask.png",
                                          "benign/benign (1)_mask_1.png")
  assert got["benign/benign (10).png"] == ("benign/benign (10)_mask.png",)
  i = [it.path for it in src.catalog.items].index("benign/benign (1).png")
  np.testing.assert_array_equal(src[i]["mask"], np.maximum(a, b) // 255)
  assert src[i]["label"] == 1


def test_drive_style_other_folder_split_names_and_region_mask(tmp_path):
  for split, ids, tag in (("training", (21, 22, 23), "training"), ("testing", (1, 2), "test")):
    for k in ids:
      _img(tmp_path / split / "images" / f"{k:02d}_{tag}.tif", np.full((6, 7, 3), k, np.uint8))
      _img(tmp_path / split / "1st_manual" / f"{k:02d}_manual1.gif", _square(6, 7, 1, 1, 2))
      _img(tmp_path / split / "mask" / f"{k:02d}_{tag}_mask.gif", _square(6, 7, 0, 0, 5))
  fields = dict(images="{split}/images/{id}_{tag}.tif", mask="{split}/1st_manual/{id}_manual1.gif",
                roi_mask="{split}/mask/{id}_{tag}_mask.gif", val_fraction=0.34)
  test = _source(tmp_path, "test", **fields)
  assert [it.path for it in test.catalog.items] == ["testing/images/01_test.tif",
                                                    "testing/images/02_test.tif"]
  r = test[0]
  assert r["image"].shape == (6, 7, 3) and int(r["mask"].sum()) == 4
  np.testing.assert_array_equal(r["roi"], _square(6, 7, 0, 0, 5, 1))
  train, val = _source(tmp_path, "train", **fields), _source(tmp_path, "val", **fields)
  assert len(train) == 2 and len(val) == 1  # val carved from training/, test is testing/
  assert {it.split for it in train.catalog.items} == {"train"}


def test_names_differing_by_a_token_float_arrays_and_groups(tmp_path):
  rng = np.random.default_rng(1)
  for p in range(1, 7):
    for n in range(3):
      x = rng.random((5, 5)).astype(np.float32)
      (tmp_path / "images").mkdir(exist_ok=True)
      (tmp_path / "labels").mkdir(exist_ok=True)
      np.save(tmp_path / "images" / f"p{p:02d}_img_{n:03d}.npy", x)
      np.save(tmp_path / "labels" / f"p{p:02d}_seg_{n:03d}.npy", (x > 0.5).astype(np.uint8))
  by_sub = _source(tmp_path, images="images/*.npy", mask_sub=(r"images/(.*)_img_", r"labels/\1_seg_"))
  by_parts = _source(tmp_path, images="images/{p}_img_{n}.npy", mask="labels/{p}_seg_{n}.npy")
  assert [it.masks for it in by_sub.catalog.items] == [it.masks for it in by_parts.catalog.items]
  assert len(by_sub) == 18
  r = by_sub[4]
  assert r["image"].dtype == np.float32 and r["image"].shape == (5, 5, 1)
  np.testing.assert_array_equal(r["mask"], (r["image"][..., 0] > 0.5).astype(np.uint8))
  fields = dict(images="images/{p}_img_{n}.npy", mask="labels/{p}_seg_{n}.npy",
                group_by=r"(p\d+)_", val_fraction=0.2, test_fraction=0.2)
  seen = {}
  for split in ("train", "val", "test"):
    src = _source(tmp_path, split, **fields)
    for g in src.groups:
      assert seen.setdefault(g, split) == split, f"group {g} in two splits"
  assert len(seen) == 6 and set(seen.values()) == {"train", "val", "test"}
  folds = collections.Counter()
  for fold in range(3):
    val = _source(tmp_path, "val", **{**fields, "num_folds": 3, "fold": fold, "test_fraction": 0.0})
    train = _source(tmp_path, "train", **{**fields, "num_folds": 3, "fold": fold,
                                          "test_fraction": 0.0})
    assert not set(val.groups) & set(train.groups)
    assert len(val) + len(train) == 18
    folds.update(it.path for it in val.catalog.items)
  assert len(folds) == 18 and set(folds.values()) == {1}  # every item in exactly one val fold
  with pytest.raises(DataError, match=r"does not match data.group_by"):
    _source(tmp_path, **{**fields, "group_by": r"(q\d+)_"}, split="train")


# ------------------------------------------------------------------ volumes and arrays


def _write_mha(path, vol):
  z, y, x = vol.shape
  header = (f"ObjectType = Image\nNDims = 3\nDimSize = {x} {y} {z}\nElementType = MET_SHORT\n"
            "ElementSpacing = 1 1 2\nElementDataFile = LOCAL\n").encode()
  path.write_bytes(header + vol.astype("<i2").tobytes())


def test_volumes_to_slices_and_whole(tmp_path):
  vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 100  # (Z, Y, X)
  seg = np.zeros((4, 5, 6), np.uint8)
  seg[1, 2, 3] = seg[3, 0, 0] = 1
  (tmp_path / "img").mkdir()
  (tmp_path / "seg").mkdir()
  nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), tmp_path / "img" / "a.nii.gz")
  nib.save(nib.Nifti1Image(seg.transpose(2, 1, 0), np.eye(4)), tmp_path / "seg" / "a.nii.gz")
  _write_mha(tmp_path / "img" / "b.mha", vol)
  _write_mha(tmp_path / "seg" / "b.mha", seg)
  fields = dict(images="img/*", mask="seg/{name}", mask_threshold=-1.0, num_mask_classes=2,
                window_level=0.0, window_width=400.0)
  src = _source(tmp_path, **fields)
  assert len(src) == 8 and src.info.image_dtype == "float32" and src.info.channels == 1
  for k in range(4):
    r = src[k]
    np.testing.assert_array_equal(r["image"][..., 0], vol[k].astype(np.float32))
    np.testing.assert_array_equal(r["mask"], seg[k])
    np.testing.assert_array_equal(src[4 + k]["image"][..., 0], vol[k].astype(np.float32))
  fg = _source(tmp_path, **fields, only_foreground=True)
  assert [s for _, s in fg.entries] == [1, 3, 1, 3]
  side = _source(tmp_path, **fields, slice_axis=2, slice_stride=2)
  assert [s for _, s in side.entries] == [0, 2, 4] * 2
  np.testing.assert_array_equal(side[1]["image"][..., 0], vol[:, :, 2])
  whole = _source(tmp_path, **fields, volume="whole")
  assert len(whole) == 2 and whole[0]["image"].shape == (4, 5, 6, 1)
  np.testing.assert_array_equal(whole[1]["mask"], seg)
  unit = _source(tmp_path, images="img/*")[0]["image"]  # no window: min-max to [0, 1]
  assert unit.dtype == np.float32 and unit.min() == 0 and unit.max() == 1


def test_arrays_kind_stacks_split_by_file_name(tmp_path):
  rng = np.random.default_rng(2)
  for split, n in (("train", 10), ("test", 4)):
    x = rng.random((n, 6, 6, 1)).astype(np.float32)
    np.save(tmp_path / f"x_{split}.npy", x)
    np.save(tmp_path / f"y_{split}.npy", np.round(x * 4) / 4)
  cfg = registry.data_config("arrays", root=str(tmp_path), images="x_{split}.npy",
                             mask="y_{split}.npy", val_fraction=0.2)
  sizes = {s: len(registry.get_source(cfg, s)) for s in ("train", "val", "test")}
  assert sizes == {"train": 8, "val": 2, "test": 4}
  test = registry.get_source(cfg, "test")
  x = np.load(tmp_path / "x_test.npy")
  np.testing.assert_array_equal(test[2]["image"], x[2])
  np.testing.assert_array_equal(test[2]["mask"], (np.round(x[2, ..., 0] * 4) / 4 >= 0.5))


# ------------------------------------------------------------------ labels, splits, channels


def test_labels_and_split_from_files(tmp_path):
  names = [f"im{k}" for k in range(6)]
  for k, n in enumerate(names):
    _img(tmp_path / "all" / f"{n}.png", np.full((4, 4), k, np.uint8))
  (tmp_path / "labels.csv").write_text(
      "id,finding\n" + "".join(f"{n}.png,{'ill' if k % 2 else 'ok'}\n"
                               for k, n in enumerate(names[:5])))
  (tmp_path / "multi.csv").write_text(
      "file,a,b\n" + "".join(f"all/{n}.png,{k % 2},{int(k > 2)}\n" for k, n in enumerate(names)))
  (tmp_path / "split.csv").write_text(
      "id,split\n" + "".join(f"{n},{'test' if k > 3 else 'training'}\n"
                             for k, n in enumerate(names)))
  single = _source(tmp_path, images="all/*.png", labels_csv="labels.csv")
  assert single.info.class_names == ("ill", "ok") and len(single) == 5
  assert [int(single[k]["label"]) for k in range(5)] == [1, 0, 1, 0, 1]
  assert single.skipped == [("all/im5.png", single.skipped[0][1])]
  assert "no row in the label table labels.csv" in single.skipped[0][1]
  multi = _source(tmp_path, images="all/*.png", labels_csv="multi.csv", label_id_column="file")
  assert multi.info.multi_label and multi.info.num_classes == 2
  np.testing.assert_array_equal(multi[3]["label"], np.array([1, 1], np.float32))
  test = _source(tmp_path, "test", images="all/*.png", split_file="split.csv")
  assert [it.path for it in test.catalog.items] == ["all/im4.png", "all/im5.png"]
  assert len(_source(tmp_path, "train", images="all/*.png", split_file="split.csv",
                     val_fraction=0.25)) == 3


def test_folder_with_only_test_split(tmp_path):
  for c in ("a", "b"):
    _img(tmp_path / "test" / c / "x.png", np.zeros((4, 4), np.uint8))
  cfg = registry.data_config("image_folder", root=str(tmp_path))
  assert len(registry.get_source(cfg, "test")) == 2
  assert len(registry.get_source(cfg, "all")) == 2
  with pytest.raises(DataError, match=rf"(?s)no train split.*{INSPECT}"):
    registry.get_source(cfg, "train")
  assert registry.get_info(cfg).class_names == ("a", "b")


def test_channels_as_stored_unless_asked(tmp_path):
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[..., 0] = 200
  _img(tmp_path / "c" / "colour.png", rgb)
  cfg = registry.data_config("image_folder", root=str(tmp_path))
  assert cfg.channels == 0
  src = registry.get_source(cfg, "all")
  assert src.info.channels == 3 and src[0]["image"].shape == (4, 4, 3)
  cfg.channels = 1
  grey = registry.get_source(cfg, "all")[0]["image"]
  assert grey.shape == (4, 4, 1) and int(grey[0, 0, 0]) == round(200 * 0.299)


def test_preset_fields_do_not_survive_a_name_change(tmp_path):
  for k in range(3):
    _img(tmp_path / "images" / f"{k}.png", np.zeros((8, 8, 3), np.uint8))
    _img(tmp_path / "masks" / f"{k}.png", _square(8, 8, 0, 0, 2))
  cfg = registry.data_config("phantoms")
  assert cfg.num_classes == 0 and cfg.num_mask_classes == 0 and cfg.channels == 0
  assert registry.get_source(cfg, "train").info.num_mask_classes == 3  # from the preset
  cfg.name, cfg.root = "image_mask_folder", str(tmp_path)
  info = registry.get_source(cfg, "all").info
  assert (info.num_classes, info.num_mask_classes, info.channels) == (0, 2, 3)
  busi = registry.data_config("busi")
  assert busi.mask == "" and busi.image_size == 256  # layout from the preset, size copied
  assert registry.fields_of(busi)["mask_combine"] == "union"


def test_errors_name_the_fields_and_the_inspector(tmp_path):
  _img(tmp_path / "a" / "x.png", np.zeros((4, 4), np.uint8))
  with pytest.raises(DataError, match=rf"(?s)no images under .*data.images='b/\*'.*a/x.png.*{INSPECT}"):
    _source(tmp_path, images="b/*")
  with pytest.raises(DataError, match=r"data.mask=.\{case\}/m.png. uses \{case\}.*data.images"):
    _source(tmp_path, images="a/*", mask="{case}/m.png")
  with pytest.raises(DataError, match=r"data.mask_combine='vote'"):
    _source(tmp_path, images="a/*", mask="a/*", mask_combine="vote")


# ------------------------------------------------------------------ masks in batches


def _batches(src, cfg, batch):
  """One train batch and the eval batches of `src` through the standard transforms."""
  tfs = transforms.build_transforms(cfg)
  train = loader.train_dataset(src, tfs, global_batch=batch, seed=0, process_index=0,
                               process_count=1)
  evals = list(loader.eval_batches(src, tfs, global_batch=batch, num_threads=1,
                                   process_index=0, process_count=1))
  return train[0], evals


def test_region_and_stacked_masks_load_in_batches(tmp_path):
  for k in (21, 22, 23):
    _img(tmp_path / "training" / "images" / f"{k}_training.tif", np.full((12, 14, 3), k, np.uint8))
    _img(tmp_path / "training" / "1st_manual" / f"{k}_manual1.gif", _square(12, 14, 2, 2, 4))
    _img(tmp_path / "training" / "mask" / f"{k}_training_mask.gif", _square(12, 14, 0, 0, 10))
  fields = dict(images="{split}/images/{id}_{tag}.tif", mask="{split}/1st_manual/{id}_manual1.gif",
                roi_mask="{split}/mask/{id}_{tag}_mask.gif", image_size=6)
  cfg = registry.data_config("folder", root=str(tmp_path), **fields)
  src = registry.get_source(cfg, "all")
  train, evals = _batches(src, cfg, 2)
  assert train["image"].shape == (2, 6, 6, 3) and train["roi"].shape == (2, 6, 6)
  assert train["roi"].dtype == np.uint8 and set(np.unique(train["roi"])) == {0, 1}
  assert [b["roi"].shape for b in evals] == [(2, 6, 6)] * 2
  want = imageio.resize_mask(_square(12, 14, 0, 0, 10, 1), (6, 6))
  np.testing.assert_array_equal(evals[0]["roi"][0], want)  # nearest, like the mask
  refs = _raters(tmp_path / "raters")
  cfg = registry.data_config("folder", root=str(tmp_path / "raters"), images="*",
                             mask="{dir}/{stem}_rater*.png", unpaired="skip",
                             mask_combine="stack", image_size=3)
  src = registry.get_source(cfg, "all")
  train, evals = _batches(src, cfg, 3)
  assert train["masks"].shape == (3, 3, 3, 3) and train["mask"].shape == (3, 3, 3)
  got = evals[0]["masks"][list(evals[0]["index"]).index(0)]
  want = np.stack([imageio.resize_mask(m.astype(np.uint8), (3, 3)) for m in refs["scan_00.jpg"]])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(evals[0]["mask"], evals[0]["masks"].max(1))


def test_stacked_masks_of_different_counts_say_why_they_do_not_batch(tmp_path):
  _raters(tmp_path)
  (tmp_path / "scan_00_rater3.png").unlink()
  cfg = registry.data_config("folder", root=str(tmp_path), images="*",
                             mask="{dir}/{stem}_rater*.png", unpaired="skip",
                             mask_combine="stack", image_size=4)
  src = registry.get_source(cfg, "all")
  with pytest.raises(DataError, match=r"(?s)field 'masks'.*\(2, 4, 4\).*data.mask_choose"):
    _batches(src, cfg, 3)


def _dicom(path, pixels, slope=1, intercept=0):
  """A tiny DICOM file holding `pixels` (int16), built from pydicom's CT test file."""
  ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
  pixels = np.asarray(pixels, np.int16)
  ds.Rows, ds.Columns = pixels.shape
  ds.PixelData = pixels.tobytes()
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path)


def test_dicom_masks_and_regions_are_read_like_the_images(tmp_path):
  rng = np.random.default_rng(3)
  seg = {}
  for k in range(3):
    _dicom(tmp_path / "images" / f"p{k}.dcm", rng.integers(0, 2000, (8, 9)), intercept=-1024)
    seg[k] = np.zeros((8, 9), np.int16)
    seg[k][k:k + 3, 2:6] = 1
    seg[k][0, 0] = 2  # a second class
    _dicom(tmp_path / "labels" / f"p{k}_seg.dcm", seg[k])
    _dicom(tmp_path / "fov" / f"p{k}.dcm", _square(8, 9, 0, 0, 7, 1))
  _img(tmp_path / "png_labels" / "p0.png", (seg[0] * 100).astype(np.uint8))
  fields = dict(images="images/{stem}.dcm", mask="labels/{stem}_seg.dcm",
                mask_threshold=-1.0, num_mask_classes=3)
  src = _source(tmp_path, **fields, roi_mask="fov/{stem}.dcm")
  assert src.info.has_mask and src.info.num_mask_classes == 3 and len(src) == 3
  for k in range(3):
    r = src[k]
    assert r["image"].shape == (8, 9, 1) and r["image"].dtype == np.float32
    assert r["mask"].dtype == np.uint8
    np.testing.assert_array_equal(r["mask"], seg[k])
    np.testing.assert_array_equal(r["roi"], _square(8, 9, 0, 0, 7, 1))
  binary = _source(tmp_path, images="images/{stem}.dcm", mask="fov/{stem}.dcm")[0]
  np.testing.assert_array_equal(binary["mask"], _square(8, 9, 0, 0, 7, 1))  # 0/1: default rule
  png = _source(tmp_path, images="images/p0.dcm", mask="png_labels/{stem}.png",
                mask_threshold=-1.0, mask_values=(0, 100, 200))[0]
  np.testing.assert_array_equal(png["mask"], seg[0])  # other formats pair with DICOM too


def test_whole_volumes_pass_the_transforms_and_batch(tmp_path):
  vol = np.arange(4 * 8 * 10, dtype=np.int16).reshape(4, 8, 10)
  seg = np.zeros((4, 8, 10), np.uint8)
  seg[:, 2:6, 2:8] = 1
  (tmp_path / "img").mkdir()
  (tmp_path / "seg").mkdir()
  for name in ("a", "b"):
    _write_mha(tmp_path / "img" / f"{name}.mha", vol)
    _write_mha(tmp_path / "seg" / f"{name}.mha", seg)
  cfg = registry.data_config("folder", root=str(tmp_path), images="img/*", mask="seg/{name}",
                             volume="whole", image_size=4, window_level=160.0,
                             window_width=320.0)
  src = registry.get_source(cfg, "all")
  tfs = transforms.build_transforms(cfg)
  out = transforms.apply_transforms(src[0], tfs)
  assert out["image"].shape == (4, 4, 4, 1) and out["mask"].shape == (4, 4, 4)
  for d in range(4):  # in-plane, slice by slice, as the 2-D pipeline does a slice
    plane = transforms.apply_transforms({"image": src[0]["image"][d], "mask": seg[d]}, tfs)
    np.testing.assert_allclose(out["image"][d], plane["image"], atol=1e-6)
    np.testing.assert_array_equal(out["mask"][d], plane["mask"])
  train, evals = _batches(src, cfg, 2)
  assert train["image"].shape == (2, 4, 4, 4, 1) and evals[0]["mask"].shape == (2, 4, 4, 4)
  _write_mha(tmp_path / "img" / "c.mha", vol[:3])
  _write_mha(tmp_path / "seg" / "c.mha", seg[:3])
  src = registry.get_source(cfg, "all")
  with pytest.raises(DataError, match=r"(?s)field '\w+'.*data.volume='whole'.*batch size of 1"):
    list(loader.eval_batches(src, tfs, global_batch=3, num_threads=1, process_index=0,
                             process_count=1))
