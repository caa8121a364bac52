"""ROI sampling by HU window, paired features and the `python -m medrep_jax.radiomics` CLI."""
import csv
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from medrep_jax import radiomics as cli
from medrep_jax.data.sources import DataError
from medrep_jax.eval.radiomics import CLASSES, rois


def _slice(seed: int, size: int = 64) -> np.ndarray:
  """A 64 px HU slice: textured lung (left), soft tissue (right), a bone block."""
  rng = np.random.default_rng(seed)
  tex = ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.2)
  tex /= tex.std()
  amp = np.linspace(0.3, 1.5, size)[:, None] * rng.uniform(0.5, 1.5)  # varies across ROIs
  hu = np.where(np.arange(size)[None, :] < size // 2, -600 + 80 * amp * tex,
                60 + 50 * amp * tex)
  hu[-12:, -12:] = 550 + 80 * tex[-12:, -12:]
  return hu


def _translated(b: np.ndarray, seed: int, sigma: float, noise: float) -> np.ndarray:
  rng = np.random.default_rng(seed)
  smooth = ndimage.gaussian_filter(b, sigma) if sigma else b
  return smooth + rng.normal(0, noise, b.shape)


def test_sample_rois_respects_the_window_and_is_deterministic():
  ref = _slice(0)
  lo, hi = rois.HU_WINDOWS["soft"]
  got = rois.sample_rois(ref, window="soft", size=12, count=8, rng=np.random.default_rng(3),
                         min_fraction=0.6)
  assert len(got) == 8
  for r in got:
    assert r.mask.shape == (12, 12) and r.row >= 0 and r.col >= 0
    assert r.row + 12 <= ref.shape[0] and r.col + 12 <= ref.shape[1]
    box = ref[r.box]
    np.testing.assert_array_equal(r.mask, (box >= lo) & (box <= hi))
    assert r.mask.mean() >= 0.6
    assert ((box[r.mask] >= lo) & (box[r.mask] <= hi)).all()
  again = rois.sample_rois(ref, window="soft", size=12, count=8,
                           rng=np.random.default_rng(3), min_fraction=0.6)
  assert [(r.row, r.col) for r in got] == [(r.row, r.col) for r in again]
  assert len({(r.row, r.col) for r in got}) == 8  # distinct boxes
  whole = rois.sample_rois(ref, window="whole", size=12, count=8, rng=np.random.default_rng(0))
  assert len(whole) == 1 and whole[0].mask.shape == ref.shape and whole[0].mask.all()


def test_sample_rois_errors_when_no_box_qualifies():
  air = np.full((32, 32), -1000.0)
  with pytest.raises(rois.NoRoiError, match=r"\[-100, 250\]"):
    rois.sample_rois(air, window="soft", size=8, count=4, rng=np.random.default_rng(0))
  with pytest.raises(rois.NoRoiError, match="does not fit"):
    rois.sample_rois(air, window="lung", size=40, count=4, rng=np.random.default_rng(0))


def test_paired_features_share_rois_across_sets():
  b = [_slice(1), _slice(2)]
  a = [_translated(x, 7, 1.5, 30) for x in b]
  got = rois.paired_features({"a": a, "same": [x.copy() for x in b], "b": b}, "b",
                             windows=("lung", "soft"), size=12, count=6,
                             rng=np.random.default_rng(0))
  assert set(got) == {"lung", "soft"}
  for sets in got.values():
    names, ref = sets["b"]
    assert ref.shape == (12, len(names)) and sets["a"][1].shape == ref.shape
    assert {n.split(".")[0] for n in names} == set(CLASSES)
    same = rois.paired_ccc(sets["same"][1], ref)
    varies = np.nanstd(ref, axis=0) > 0
    np.testing.assert_allclose(same[varies], 1.0, atol=1e-9)
    assert np.nanmean(rois.paired_ccc(sets["a"][1], ref)) < 0.99


def _folders(tmp_path, n: int = 3) -> dict[str, str]:
  dirs = {k: tmp_path / k for k in ("A", "B", "better")}
  for d in dirs.values():
    d.mkdir()
  for i in range(n):
    b = _slice(10 + i)
    np.save(dirs["B"] / f"s{i}.npy", b)
    np.save(dirs["A"] / f"s{i}.npy", _translated(b, 100 + i, 1.5, 40))
    np.save(dirs["better"] / f"s{i}.npy", _translated(b, 200 + i, 0.0, 5))
  return {k: str(v) for k, v in dirs.items()}


def _argv(d, out, *extra):
  return ["--images", d["A"], "--reference", d["B"], "--compare", f"better={d['better']}",
          "--output", str(out), "--windows", "lung,soft", "--roi-size", "12",
          "--rois-per-image", "5", "--no_progress", *extra]


def test_cli_end_to_end(tmp_path, capsys):
  d = _folders(tmp_path)
  out = tmp_path / "out"
  assert cli.main(_argv(d, out)) == 0
  assert {p.name for p in out.iterdir()} == {"features.csv", "ccc.csv", "ccc_table.md",
                                             "ccc_bars.png"}
  with open(out / "features.csv", newline="") as f:
    feats = list(csv.DictReader(f))
  assert len(feats) == 3 * 2 * 3 * 5  # sets x windows x slices x ROIs
  assert {r["set"] for r in feats} == {"images", "better", "reference"}
  with open(out / "ccc.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert {r["window"] for r in rows} == {"lung", "soft"}
  assert {r["class"] for r in rows} == set(CLASSES)
  glcm = [(float(r["images"]), float(r["better"])) for r in rows if r["class"] == "GLCM"]
  base, better = np.nanmean(np.array(glcm), axis=0)
  assert better > base + 0.1, (base, better)
  table = (out / "ccc_table.md").read_text()
  assert "| set | GOH | GLCM | GLRLM | ID | IH | NID |" in table
  assert "| better |" in table and "## lung: [-800, -300] HU, 15 ROIs" in table
  assert (out / "ccc_bars.png").read_bytes()[:4] == b"\x89PNG"
  assert "Wrote features.csv" in capsys.readouterr().out


def test_cli_masks_replace_the_windows(tmp_path):
  d = _folders(tmp_path, n=2)
  masks = tmp_path / "masks"
  masks.mkdir()
  for i in range(2):
    m = np.zeros((64, 64), np.uint8)
    m[4:20, 4:20], m[30:50, 40:60] = 1, 2  # two labelled ROIs per slice
    np.save(masks / f"s{i}.npy", m)
  out = tmp_path / "out"
  assert cli.main(_argv(d, out, "--masks", str(masks))) == 0
  with open(out / "features.csv", newline="") as f:
    feats = list(csv.DictReader(f))
  assert {r["window"] for r in feats} == {"mask"} and len(feats) == 3 * 2 * 2
  assert feats[0]["n_pixels"] == "256"


def test_cli_reads_16_bit_png_with_a_value_offset(tmp_path):
  from PIL import Image
  d = _folders(tmp_path, n=2)
  for folder in d.values():
    for f in sorted(pathlib.Path(folder).glob("*.npy")):
      stored = np.clip(np.round(np.load(f) + 1024), 0, 65535).astype(np.uint16)
      Image.fromarray(stored).save(f.with_suffix(".png"))
      f.unlink()
  argv = _argv(d, tmp_path / "out", "--windows", "lung")
  with pytest.raises(DataError, match="no window has the 2 ROIs"):
    cli.main(argv)  # stored values are not HU: nothing lies in [-800, -300]
  assert cli.main(argv + ["--value-offset", "-1024"]) == 0
  with open(tmp_path / "out" / "features.csv", newline="") as f:
    means = [float(r["ID.stat_mean"]) for r in csv.DictReader(f)]
  assert len(means) == 3 * 2 * 5 and -800 < min(means) and max(means) < -300


def test_cli_names_an_unpaired_file_and_can_skip_it(tmp_path):
  d = _folders(tmp_path, n=2)
  np.save(tmp_path / "A" / "lonely.npy", _slice(0))
  with pytest.raises(DataError, match="lonely.npy"):
    cli.main(_argv(d, tmp_path / "out"))
  assert cli.main(_argv(d, tmp_path / "out2", "--skip-unpaired")) == 0


def test_cli_refuses_a_non_empty_output(tmp_path):
  d = _folders(tmp_path, n=2)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    cli.main(_argv(d, out))
  assert cli.main(_argv(d, out, "--overwrite")) == 0
  assert (out / "keep.txt").read_text() == "mine"
