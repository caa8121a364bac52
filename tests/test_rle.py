"""RLE masks (medrep_jax.data.rle) against a by-hand NumPy reference, and the RLE CSV source."""
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from medrep_jax.data import registry, rle
from medrep_jax.data.rle_source import RLEMaskCSV
from medrep_jax.data.sources import DataError

SHAPE = (5, 7)  # (H, W)


def _reference(text, shape, *, relative, order):
  """Fills the runs pixel by pixel: the definitions written out with loops."""
  h, w = shape
  out = np.zeros(shape, np.uint8)
  if text.strip() in ("", "-1"):
    return out
  nums = [int(t) for t in text.split()]
  end = 0  # end of the previous run (relative starts count from it)
  for start, length in zip(nums[0::2], nums[1::2]):
    first = end + start if relative else start - 1
    for i in range(first, first + length):
      y, x = (i % h, i // h) if order == "F" else (i // w, i % w)
      out[y, x] = 1
    end = first + length
  return out


def _random_runs(rng, shape, *, relative, order, n_runs):
  """A random valid RLE text (disjoint, sorted runs) and its reference mask."""
  n = shape[0] * shape[1]
  cuts = np.sort(rng.choice(np.arange(1, n), size=2 * n_runs, replace=False))
  begins, ends = cuts[0::2], cuts[1::2]
  if relative:
    starts = begins - np.r_[0, ends[:-1]]
  else:
    starts = begins + 1
  text = " ".join(f"{s} {e - b}" for s, b, e in zip(starts, begins, ends))
  return text, _reference(text, shape, relative=relative, order=order)


# ---------------------------------------------------------------- decoding


def test_decode_relative_column_major_by_hand():
  # "3 4 6 2": pixels 3..6 (from 0), then 7 + 6 = 13, 14. Column-major on 5x7:
  # index = x * 5 + y, so 3, 4 -> (y 3, 4; x 0); 5, 6 -> (y 0, 1; x 1); 13, 14 -> (y 3, 4; x 2).
  want = np.zeros(SHAPE, np.uint8)
  want[3:5, 0] = 1
  want[0:2, 1] = 1
  want[3:5, 2] = 1
  got = rle.decode_rle("3 4 6 2", SHAPE, relative=True, order="F")
  assert got.dtype == np.uint8 and got.shape == SHAPE
  np.testing.assert_array_equal(got, want)
  # The same pixels as absolute 1-based starts: 4 (pixel 3) and 14 (pixel 13).
  np.testing.assert_array_equal(rle.decode_rle("4 4 14 2", SHAPE, relative=False), want)
  np.testing.assert_array_equal(_reference("3 4 6 2", SHAPE, relative=True, order="F"), want)


def test_decode_absolute_row_major_by_hand():
  # Row-major: index = y * 7 + x; pixels 3..6 -> row 0, x 3..6; 13 -> (1, 6); 14 -> (2, 0).
  want = np.zeros(SHAPE, np.uint8)
  want[0, 3:7] = 1
  want[1, 6] = 1
  want[2, 0] = 1
  got = rle.decode_rle("4 4 14 2", SHAPE, relative=False, order="C")
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(rle.decode_rle("3 4 6 2", SHAPE, relative=True, order="C"),
                                want)


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("order", ["F", "C"])
def test_decode_matches_reference_on_random_runs(relative, order):
  rng = np.random.default_rng(7)
  for n_runs in (1, 2, 5, 10):
    text, want = _random_runs(rng, SHAPE, relative=relative, order=order, n_runs=n_runs)
    got = rle.decode_rle(text, SHAPE, relative=relative, order=order)
    np.testing.assert_array_equal(got, want, err_msg=text)
  # Runs touching the first and the last pixel.
  n = SHAPE[0] * SHAPE[1]
  text = f"{0 if relative else 1} 2 {n - 4 if relative else n - 1} 2"
  np.testing.assert_array_equal(rle.decode_rle(text, SHAPE, relative=relative, order=order),
                                _reference(text, SHAPE, relative=relative, order=order))


def test_empty_and_several_rows_or_ed():
  for text in ("-1", " -1 ", "", "  "):
    got = rle.decode_rle(text, SHAPE, relative=True)
    assert got.shape == SHAPE and not got.any()
  rows = ["1 3", "-1", "2 4 10 1"]  # relative; rows 0 and 2 overlap at pixels 2, 3
  want = np.zeros(SHAPE, np.uint8)
  for text in rows:
    want |= _reference(text, SHAPE, relative=True, order="F")
  got = rle.decode_rles(rows, SHAPE, relative=True, order="F")
  np.testing.assert_array_equal(got, want)
  assert got.max() == 1 and want.sum() < sum(
      _reference(t, SHAPE, relative=True, order="F").sum() for t in rows)
  # Absolute runs may overlap inside one text; the pixels are OR-ed too.
  np.testing.assert_array_equal(rle.decode_rle("1 4 3 4", SHAPE, relative=False),
                                rle.decode_rle("1 6", SHAPE, relative=False))


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("order", ["F", "C"])
def test_encode_decode_round_trip(relative, order):
  rng = np.random.default_rng(3)
  masks = [rng.random((13, 9)) < p for p in (0.05, 0.3, 0.5, 0.9)]
  masks += [np.zeros((13, 9), bool), np.ones((13, 9), bool)]
  for mask in masks:
    text = rle.encode_rle(mask.astype(np.uint8) * 255, relative=relative, order=order)
    got = rle.decode_rle(text, mask.shape, relative=relative, order=order)
    np.testing.assert_array_equal(got, mask.astype(np.uint8))
    np.testing.assert_array_equal(_reference(text, mask.shape, relative=relative, order=order),
                                  got)
  assert rle.encode_rle(np.zeros(SHAPE), relative=True) == "-1"
  assert rle.encode_rle(np.zeros(SHAPE), relative=False) == ""
  want = rle.decode_rle("3 4 6 2", SHAPE, relative=True)
  assert rle.encode_rle(want, relative=True, order="F") == "3 4 6 2"
  assert rle.encode_rle(want, relative=False, order="F") == "4 4 14 2"


def test_bad_rle_raises_with_text_and_shape():
  cases = {
      "33 5": "past",            # pixels 33..37 of 35
      "3 4 30 2": "past",        # relative: second run starts at 37
      "36 1": "past",            # absolute start past the last pixel (relative=False below)
      "3 4 x 2": "'x' is not an integer",
      "3 4.5": "'4.5' is not an integer",
      "3 4 6": "odd count",
      "3 -4": "negative length",
  }
  for text, match in cases.items():
    relative = text != "36 1"
    with pytest.raises(DataError, match=match) as info:
      rle.decode_rle(text, SHAPE, relative=relative)
    assert "5x7" in str(info.value) and text in str(info.value)
  with pytest.raises(DataError, match="1-based"):
    rle.decode_rle("0 3", SHAPE, relative=False)
  with pytest.raises(DataError, match="not an integer"):
    rle.decode_rle("1 99999999999999999999999", SHAPE, relative=True)
  long_text = " ".join(["1 1"] * 100) + " 1000 1"
  with pytest.raises(DataError, match=r"\.\.\.") as info:
    rle.decode_rle(long_text, SHAPE, relative=True)
  assert long_text not in str(info.value) and len(str(info.value)) < 300
  with pytest.raises(DataError, match="order"):
    rle.decode_rle("1 1", SHAPE, relative=True, order="K")


# ---------------------------------------------------------------- the CSV source

H, W = 6, 8


def _png(path, value=100):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((H, W), value, np.uint8)).save(path)


def _siim_tree(root, n=10):
  """PNG images in nested folders, `train-rle.csv` with SIIM's header and relative RLE:
  even images get a mask (image 0 two rows), odd ones "-1"."""
  lines = ["ImageId, EncodedPixels"]
  masks = {}
  for i in range(n):
    image_id = f"1.2.3.{i}"
    _png(root / "images" / f"study{i % 3}" / f"{image_id}.png", value=10 * i)
    if i % 2:
      lines.append(f"{image_id}, -1")
      masks[image_id] = np.zeros((H, W), np.uint8)
      continue
    region = f"{i + 1} 3 5 2"
    lines.append(f"{image_id}, {region}")
    masks[image_id] = _reference(region, (H, W), relative=True, order="F")
    if i == 0:
      lines.append(f"{image_id}, 40 4")
      masks[image_id] |= _reference("40 4", (H, W), relative=True, order="F")
  (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
  return masks


def test_rle_source_records_and_splits(tmp_path):
  masks = _siim_tree(tmp_path)
  src = RLEMaskCSV(tmp_path, "all")
  assert len(src) == 10 and src.info.has_mask and src.info.num_mask_classes == 2
  assert src.info.num_classes == 2 and src.info.channels == 1
  for k in range(len(src)):
    r = src[k]
    image_id = src.items[k].path.rsplit("/", 1)[-1][:-4]
    assert r["image"].shape == (H, W, 1) and r["image"].dtype == np.uint8
    np.testing.assert_array_equal(r["mask"], masks[image_id])
    assert r["label"] == int(masks[image_id].any()) == src.labels[k]
    assert r["index"] == k
  assert src.labels.sum() == 5
  parts = {s: RLEMaskCSV(tmp_path, s, val_fraction=0.2, test_fraction=0.2)
           for s in ("train", "val", "test")}
  paths = {s: {it.path for it in p.items} for s, p in parts.items()}
  assert not paths["train"] & paths["val"] and not paths["train"] & paths["test"]
  assert not paths["val"] & paths["test"]
  assert set().union(*paths.values()) == {it.path for it in src.items}
  for s in ("val", "test"):  # stratified by label: one positive and one negative each
    assert sorted(parts[s].labels.tolist()) == [0, 1]
  again = RLEMaskCSV(tmp_path, "val", val_fraction=0.2, test_fraction=0.2)
  assert [it.path for it in again.items] == [it.path for it in parts["val"].items]


def test_rle_source_in_the_registry(tmp_path):
  masks = _siim_tree(tmp_path)
  cfg = registry.data_config("rle_csv", root=str(tmp_path), channels=3)
  src = registry.get_source(cfg, "all")
  assert isinstance(src, RLEMaskCSV) and src.info.name == "rle_csv"
  r = src[0]
  assert r["image"].shape == (H, W, 3)
  np.testing.assert_array_equal(r["mask"], masks["1.2.3.0"])
  assert registry.get_info(cfg).has_mask
  # Absolute, row-major RLE in a renamed table with other column names.
  lines = ["name,rle"]
  for i in range(3):
    lines.append(f"1.2.3.{i},{rle.encode_rle(masks[f'1.2.3.{i}'], relative=False, order='C')}")
  (tmp_path / "abs.csv").write_text("\n".join(lines) + "\n")
  cfg = registry.data_config("rle_csv", root=str(tmp_path), rle_csv="abs.csv",
                             rle_id_column="name", rle_column="rle", rle_relative=False,
                             rle_order="C", unpaired="skip")
  src = registry.get_source(cfg, "all")
  assert len(src) == 3 and len(src.skipped) == 7
  for k in range(3):
    np.testing.assert_array_equal(src[k]["mask"], masks[f"1.2.3.{k}"])


def test_rle_source_errors_name_the_file_and_row(tmp_path):
  _siim_tree(tmp_path)
  with pytest.raises(DataError, match="nothere.csv"):
    RLEMaskCSV(tmp_path, "all", csv_path="nothere.csv")
  with pytest.raises(DataError, match="no column 'Pixels'"):
    RLEMaskCSV(tmp_path, "all", rle_column="Pixels")
  table = tmp_path / "train-rle.csv"
  text = table.read_text()
  # A CSV id with no image: named with its line; skipped on request.
  table.write_text(text + "9.9.9, 1 2\n")
  with pytest.raises(DataError, match=r"train-rle.csv line 13: no image for ImageId '9.9.9'"):
    RLEMaskCSV(tmp_path, "all")
  src = RLEMaskCSV(tmp_path, "all", unpaired="skip")
  assert len(src) == 10 and any("9.9.9" in reason for _, reason in src.skipped)
  # An image with no row.
  table.write_text(text)
  _png(tmp_path / "images" / "extra.png")
  with pytest.raises(DataError, match=r"extra.png has no row"):
    RLEMaskCSV(tmp_path, "all")
  assert len(RLEMaskCSV(tmp_path, "all", skip_corrupt=True)) == 10
  (tmp_path / "images" / "extra.png").unlink()
  # A bad RLE row fails when its image is read, naming the line and the image.
  table.write_text(text.replace("1.2.3.2, 3 3 5 2", "1.2.3.2, 3 3 500 2"))
  src = RLEMaskCSV(tmp_path, "all")
  k = next(i for i, it in enumerate(src.items) if it.path.endswith("1.2.3.2.png"))
  with pytest.raises(DataError, match=r"line 5 \(image .*1\.2\.3\.2\.png\).*past") as info:
    src[k]
  assert "6x8" in str(info.value)
  lenient = RLEMaskCSV(tmp_path, "all", skip_corrupt=True)
  assert lenient[k]["index"] != k and lenient.num_skipped == 1


def test_rle_source_reads_nested_dicom(tmp_path):
  ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
  raw = ds.pixel_array.astype(np.float32)
  h, w = raw.shape
  image_id = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"
  folder = tmp_path / "dicom-images-train" / "1.2.276.0.1" / "1.2.276.0.2"
  folder.mkdir(parents=True)
  ds.save_as(folder / f"{image_id}.dcm")
  mask = np.zeros((h, w), np.uint8)
  mask[40:60, 30:50] = 1
  (tmp_path / "train-rle.csv").write_text(
      f"ImageId, EncodedPixels\n{image_id}, {rle.encode_rle(mask, relative=True)}\n")
  src = RLEMaskCSV(tmp_path, "all", images="dicom-images-train/**/*.dcm")
  assert src.info.image_dtype == "float32" and src.info.channels == 1
  r = src[0]
  hu = raw * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
  np.testing.assert_array_equal(r["image"][..., 0], hu)
  np.testing.assert_array_equal(r["mask"], mask)
  assert r["label"] == 1
