"""Radiomic features against the IBSI 1 digital phantom, plus discretisation and GOH.

The conformance test computes every implemented feature on the phantom for every
aggregation in the reference CSV and applies IBSI's criterion: the value, rounded to the
3 significant digits the reference is reported with, must lie within the CSV tolerance.
"""
import csv
import math

import numpy as np
import pytest

from medrep_jax.eval import radiomics
from medrep_jax.eval.radiomics import discretise, glcm, glrlm, goh, texture

# IBSI family (CSV `family`) -> feature class, and the number of CSV rows it must have.
IMPLEMENTED = {"intensity_statistics": ("ID", 18), "intensity_histogram": ("IH", 23),
               "GLCM": ("GLCM", 150), "GLRLM": ("GLRLM", 96), "NGTDM": ("NID", 15)}


@pytest.fixture(scope="module")
def phantom_dir(data_dir):
  d = data_dir / "ibsi_digital_phantom"
  if not (d / "phantom.npy").exists():
    pytest.skip(f"IBSI digital phantom not found under {d}")
  return d


@pytest.fixture(scope="module")
def phantom(phantom_dir):
  return np.load(phantom_dir / "phantom.npy"), np.load(phantom_dir / "mask.npy")


@pytest.fixture(scope="module")
def reference(phantom_dir):
  with open(phantom_dir / "ibsi1_digital_phantom_reference_values.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def phantom_features(phantom):
  image, mask = phantom
  return radiomics.extract(image, mask, aggregations=texture.AGGREGATIONS,
                           ngtdm_aggregations=texture.NEIGHBOURHOOD_AGGREGATIONS)


def _ibsi_match(value: float, ref: float, tol: float) -> bool:
  """IBSI's criterion: |value rounded to 3 significant digits - ref| <= tol."""
  if not math.isfinite(value):
    return False
  rounded = float(f"{value:.3g}")
  return abs(rounded - ref) <= tol + 1e-9 * abs(ref)


def _rows(reference, family):
  return [r for r in reference if r["family"] == family]


@pytest.mark.parametrize("family", sorted(IMPLEMENTED))
def test_ibsi_phantom_reference_values(family, reference, phantom_features):
  cls, n_rows = IMPLEMENTED[family]
  rows = _rows(reference, family)
  assert len(rows) == n_rows, f"{family}: the CSV has {len(rows)} rows, expected {n_rows}"
  missing = [r["tag"] for r in rows if f"{cls}.{r['tag']}" not in phantom_features]
  assert not missing, f"{family}: no computed value for {missing}"
  unvalued = [r["tag"] for r in rows if not r["reference_value"]]
  assert not unvalued, f"{family}: rows without a reference value {unvalued}"
  bad = []
  for r in rows:
    value = phantom_features[f"{cls}.{r['tag']}"]
    ref, tol = float(r["reference_value"]), float(r["tolerance"])
    if not _ibsi_match(value, ref, tol):
      bad.append(f"{r['tag']} ({r['feature']}, {r['aggregation']}): computed {value:.6g}, "
                 f"reference {ref:g} +- {tol:g}")
  assert not bad, f"{family}: {len(bad)}/{len(rows)} rows off:\n" + "\n".join(bad)


def test_every_feature_of_an_implemented_family_is_in_the_csv(reference, phantom_features):
  """Both ways: no CSV row left out above, no computed ID/IH/texture feature unchecked."""
  expected = {f"{IMPLEMENTED[r['family']][0]}.{r['tag']}" for r in reference
              if r["family"] in IMPLEMENTED}
  computed = {k for k in phantom_features if not k.startswith("GOH.")}
  assert computed == expected, (sorted(computed - expected)[:10], sorted(expected - computed)[:10])


def test_aggregation_codes_match_the_csv(reference):
  for r in reference:
    if r["family"] in ("GLCM", "GLRLM"):
      table = texture.AGGREGATIONS
    elif r["family"] == "NGTDM":
      table = texture.NEIGHBOURHOOD_AGGREGATIONS
    else:
      continue
    suffix = next(s for s in table if r["tag"].endswith("_" + s))
    assert table[suffix] == (r["aggregation_code"], r["aggregation"]), r["tag"]


def test_feature_classes(phantom_features, reference):
  for r in reference:
    if r["family"] in IMPLEMENTED:
      assert radiomics.FEATURE_CLASS[r["family"]] == IMPLEMENTED[r["family"]][0]
      assert radiomics.feature_class(r["tag"]) == IMPLEMENTED[r["family"]][0]
  assert {radiomics.feature_class(k) for k in phantom_features} == set(radiomics.CLASSES)
  with pytest.raises(KeyError, match="xyz_mean"):
    radiomics.feature_class("xyz_mean")


def test_phantom_needs_no_discretisation(phantom):
  """IBSI: FBN with 6 bins over [1, 6], or FBS with width 1, leaves the phantom as it is."""
  image, mask = phantom
  raw, n = discretise.grey_levels(image, mask)
  fbn, n_fbn = discretise.grey_levels(image, mask, n_bins=6)
  fbs, n_fbs = discretise.grey_levels(image, mask, bin_width=1)
  np.testing.assert_array_equal(raw, np.where(mask > 0, image, 0))
  np.testing.assert_array_equal(fbn, raw)
  np.testing.assert_array_equal(fbs, raw)
  assert n == n_fbn == n_fbs == 6


def test_fixed_bin_number_by_hand():
  # floor(N_g (X - X_min) / (X_max - X_min)) + 1, X_max -> N_g
  np.testing.assert_array_equal(
      discretise.fixed_bin_number(np.array([0., 1, 2, 3, 4, 5, 10]), 5), [1, 1, 2, 2, 3, 3, 5])
  np.testing.assert_array_equal(
      discretise.fixed_bin_number(np.array([-100., -50, 0, 50, 100]), 4), [1, 2, 3, 4, 4])
  np.testing.assert_array_equal(  # a fixed range (an HU window) instead of the ROI extremes
      discretise.fixed_bin_number(np.array([-50., 0, 49]), 4, lo=-100, hi=100), [2, 3, 3])
  np.testing.assert_array_equal(discretise.fixed_bin_number(np.full(3, 7.0), 8), [1, 1, 1])
  with pytest.raises(ValueError, match="outside the range"):
    discretise.fixed_bin_number(np.array([-200., 0]), 4, lo=-100, hi=100)


def test_fixed_bin_size_by_hand():
  # floor((X - X_b) / w_b) + 1
  x = np.array([-1000., -975, -950.5, -925, -900])
  np.testing.assert_array_equal(discretise.fixed_bin_size(x, 25), [1, 2, 2, 4, 5])
  np.testing.assert_array_equal(discretise.fixed_bin_size(x, 25, lo=-1024), [1, 2, 3, 4, 5])
  with pytest.raises(ValueError, match="below the lower bound"):
    discretise.fixed_bin_size(x, 25, lo=-950)
  with pytest.raises(ValueError, match="bin_width"):
    discretise.fixed_bin_size(x, 0)


def test_grey_levels_errors_and_range():
  image = np.array([[0.5, 1.5], [2.5, 9.0]])
  mask = np.array([[1, 1], [1, 0]])
  levels, n = discretise.grey_levels(image, mask, bin_width=1.0, hi=5.5)
  np.testing.assert_array_equal(levels, [[1, 2], [3, 0]])
  assert n == 6  # the level of `hi`, so every ROI shares N_g
  with pytest.raises(ValueError, match="not integer grey levels"):
    discretise.grey_levels(image, mask)
  with pytest.raises(ValueError, match="not both"):
    discretise.grey_levels(image, mask, n_bins=4, bin_width=1.0)
  with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
    discretise.grey_levels(image, np.ones((3, 2)))
  with pytest.raises(ValueError, match="selects no voxel"):
    discretise.grey_levels(image, np.zeros((2, 2)))


def test_glcm_counts_by_hand():
  g = np.array([[1, 2], [2, 1]])  # [x, y]; direction (1, 0, 0) pairs (1,2) and (2,1)
  counts = glcm.matrices(g[:, :, None], 2, three_d=False)["counts"]
  d = texture.OFFSETS_2D.index((1, 0, 0))
  np.testing.assert_array_equal(counts[0, d], [[0, 2], [2, 0]])
  d = texture.OFFSETS_2D.index((1, 1, 0))  # one diagonal pair (1, 1), symmetrised
  np.testing.assert_array_equal(counts[0, d], [[2, 0], [0, 0]])


def _naive_runs(g, m, n_levels):
  """Run-length matrix by walking every line voxel by voxel (a test reference)."""
  out = np.zeros((n_levels, max(g.shape)), int)
  for k in np.ndindex(g.shape):
    prev = tuple(np.subtract(k, m))
    if g[k] == 0 or (all(0 <= p < s for p, s in zip(prev, g.shape)) and g[prev] == g[k]):
      continue
    length, nxt = 1, tuple(np.add(k, m))
    while all(0 <= p < s for p, s in zip(nxt, g.shape)) and g[nxt] == g[k]:
      length, nxt = length + 1, tuple(np.add(nxt, m))
    out[g[k] - 1, length - 1] += 1
  return out


def test_run_lengths_match_a_naive_walk():
  rng = np.random.default_rng(0)
  g = rng.integers(1, 4, size=(7, 6, 3)) * (rng.random((7, 6, 3)) < 0.85)
  runs = glrlm.matrices(g, 3, three_d=True)["runs"][0]
  for d, m in enumerate(texture.OFFSETS_3D):
    np.testing.assert_array_equal(runs[d], _naive_runs(g, m, 3), err_msg=str(m))


@pytest.mark.parametrize("n_bins", [8, 16])
@pytest.mark.parametrize("direction, angle", [((1, 0), 0.0), ((0, 1), 90.0),
                                              ((1, 1), 45.0), ((-1, 0), 180.0)])
def test_goh_ramp_has_one_orientation(n_bins, direction, angle):
  x, y = np.meshgrid(np.arange(12.0), np.arange(10.0), indexing="ij")
  ramp = 3.0 * (direction[0] * x + direction[1] * y)
  mask = np.ones_like(ramp)
  f = goh.features(ramp, mask, n_bins=n_bins)
  fractions = np.array([f[f"goh_bin_{k:02d}"] for k in range(n_bins)])
  expected = int(round(angle / (360 / n_bins))) % n_bins
  assert fractions[expected] == pytest.approx(1.0)
  assert f["goh_entropy"] == pytest.approx(0.0) and f["goh_uniformity"] == pytest.approx(1.0)
  assert f["goh_mean_magnitude"] == pytest.approx(3.0 * np.hypot(*direction))


def test_goh_spacing_and_flat_roi():
  x = np.arange(8.0)[:, None] * np.ones((1, 8))
  f = goh.features(x, np.ones_like(x), spacing=(2.0, 1.0))
  assert f["goh_mean_magnitude"] == pytest.approx(0.5) and f["goh_bin_00"] == 1.0
  flat = goh.features(np.ones((5, 5)), np.ones((5, 5)))
  assert math.isnan(flat["goh_entropy"]) and flat["goh_mean_magnitude"] == 0.0
  with pytest.raises(ValueError, match="spacing"):
    goh.features(x, np.ones_like(x), spacing=(1.0,))


def _blob(shape, seed):
  rng = np.random.default_rng(seed)
  image = rng.normal(0.0, 50.0, size=shape).round()
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  mask = (grid ** 2).sum(0) < 0.8 + 0.1 * rng.random(shape)
  return image, mask


@pytest.mark.parametrize("transform", ["flip_x", "flip_y", "flip_z", "rot90_xy"])
def test_features_invariant_to_flips(transform):
  image, mask = _blob((11, 9, 5), seed=1)
  op = {"flip_x": lambda a: a[::-1], "flip_y": lambda a: a[:, ::-1],
        "flip_z": lambda a: a[:, :, ::-1], "rot90_xy": lambda a: np.rot90(a, axes=(0, 1))}
  kw = dict(n_bins=12, aggregations=texture.AGGREGATIONS,
            ngtdm_aggregations=texture.NEIGHBOURHOOD_AGGREGATIONS)
  a = radiomics.extract(image, mask, **kw)
  b = radiomics.extract(op[transform](image), op[transform](mask), **kw)
  assert a.keys() == b.keys()
  bins = [k for k in a if k.startswith("GOH.goh_bin_")]
  for k in a.keys() - set(bins):  # GOH bins are permuted, everything else is unchanged
    assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k
  np.testing.assert_allclose(sorted(b[k] for k in bins), sorted(a[k] for k in bins),
                             atol=1e-12)


def test_2d_image_matches_a_one_slice_volume():
  image, mask = _blob((12, 10), seed=2)
  flat = radiomics.extract(image, mask, n_bins=8)
  vol = radiomics.extract(image[:, :, None], mask[:, :, None], n_bins=8,
                          aggregations=("2D_avg", "2D_comb"), ngtdm_aggregations=("2D",))
  assert flat.keys() == vol.keys()
  assert not any("3D" in k or "2_5D" in k for k in flat)
  for k in flat:
    assert vol[k] == pytest.approx(flat[k], rel=1e-12, abs=1e-12), k
  names, table = radiomics.stack([flat, flat])
  assert table.shape == (2, len(names)) and names == list(flat)


def test_extract_errors_name_the_problem():
  image, mask = _blob((6, 6), seed=3)
  with pytest.raises(ValueError, match=r"\(6, 6\).*\(6, 5\)"):
    radiomics.extract(image, mask[:, :5], n_bins=4)
  with pytest.raises(ValueError, match="unknown aggregation"):
    radiomics.extract(image, mask, n_bins=4, aggregations=("3D",))
  with pytest.raises(ValueError, match="unknown feature classes"):
    radiomics.extract(image, mask, n_bins=4, classes=("NGTDM",))
  with pytest.raises(ValueError, match="non-finite"):
    radiomics.extract(np.where(mask, np.nan, image), mask, n_bins=4)
  only = radiomics.extract(image, mask, n_bins=4, classes=("ID", "NID"))
  assert {radiomics.feature_class(k) for k in only} == {"ID", "NID"}
