"""Lin's concordance correlation coefficient and the per-class summary of Table I."""
import math
import warnings

import numpy as np
import pytest

from medrep_jax.eval import concordance


def _ccc_loop(x, y):
  """Lin (1989) written out with plain loops and population moments: a test reference."""
  n = len(x)
  mx, my = sum(x) / n, sum(y) / n
  vx = sum((a - mx) ** 2 for a in x) / n
  vy = sum((b - my) ** 2 for b in y) / n
  cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
  return 2 * cov / (vx + vy + (mx - my) ** 2)


def test_matches_a_reference_loop_per_feature():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 7)) * [1, 10, 100, 0.1, 1, 5, 2]
  y = 0.8 * x + rng.normal(size=x.shape) + [0, 1, -3, 0.2, 0, 0, 5]
  got = concordance.ccc(x, y)
  assert got.shape == (7,)
  want = [_ccc_loop(list(x[:, j]), list(y[:, j])) for j in range(7)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert isinstance(concordance.ccc(x[:, 0], y[:, 0]), float)
  assert concordance.ccc(x[:, 0], y[:, 0]) == pytest.approx(want[0], rel=1e-12)


def test_perfect_agreement_is_one_and_a_shift_lowers_it():
  x = np.linspace(-2.0, 3.0, 25)
  assert concordance.ccc(x, x) == pytest.approx(1.0)
  shifted = [concordance.ccc(x, x + c) for c in (0.1, 0.5, 2.0)]
  assert 1.0 > shifted[0] > shifted[1] > shifted[2] > 0
  # Pearson's r is 1 for y = 2x + 1, but concordance is not.
  assert concordance.ccc(x, 2 * x + 1) < 0.9
  c = x - x.mean()
  assert concordance.ccc(c, -c) == pytest.approx(-1.0)  # -1 needs equal means too


def test_lin_denominator_not_the_papers_typo():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  y = np.array([2.0, 4.0, 5.0, 9.0])
  sx2, sy2 = x.var(), y.var()
  lin = 2 * np.cov(x, y, bias=True)[0, 1] / (sx2 + sy2 + (x.mean() - y.mean()) ** 2)
  typo = 2 * np.cov(x, y, bias=True)[0, 1] / (sx2 * sy2 + (x.mean() - y.mean()) ** 2)
  assert concordance.ccc(x, y) == pytest.approx(lin)
  assert concordance.ccc(x, y) != pytest.approx(typo)


def test_constant_equal_inputs_warn_and_give_nan():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 3))
  x[:, 1] = 0.1  # a float whose mean is not exactly 0.1: must still not give 1.0
  y = x.copy()
  with pytest.warns(concordance.ConstantFeatureWarning, match="glcm_energy"):
    out = concordance.ccc(x, y, names=["a", "glcm_energy", "c"])
  assert math.isnan(out[1]) and out[0] == pytest.approx(1.0) and out[2] == pytest.approx(1.0)
  with pytest.warns(concordance.ConstantFeatureWarning, match=r"\[1\]"):
    concordance.ccc(x, y)
  with pytest.raises(ValueError, match="constant"):
    concordance.ccc(x, y, on_constant="raise")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert math.isnan(concordance.ccc(x, y, on_constant="ignore")[1])
    # constant in both but different values, or constant in one only: CCC 0, no warning
    assert concordance.ccc(np.full(5, 2.0), np.full(5, 3.0)) == 0.0
    assert concordance.ccc(np.full(5, 2.0), np.arange(5.0)) == 0.0


def test_bad_inputs_name_the_shapes():
  with pytest.raises(ValueError, match=r"\(5, 2\).*\(5, 3\)"):
    concordance.ccc(np.zeros((5, 2)), np.zeros((5, 3)))
  x = np.ones((4, 2))
  x[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"\(4, 2\).*non-finite.*\[1\]"):
    concordance.ccc(x, np.ones((4, 2)))
  with pytest.raises(ValueError, match=r"\(4, 2\).*non-finite"):
    concordance.ccc(np.ones((4, 2)), np.where(x > 0, np.inf, 0))
  with pytest.raises(ValueError, match="at least 2"):
    concordance.ccc(np.ones(1), np.ones(1))
  with pytest.raises(ValueError, match="2 names for 3 features"):
    concordance.ccc(np.random.rand(4, 3), np.random.rand(4, 3), names=["a", "b"])
  with pytest.raises(ValueError, match="on_constant"):
    concordance.ccc(np.ones(3), np.ones(3), on_constant="skip")


def test_class_summary_numbers():
  values = np.array([1.0, 0.8, 0.6, 0.5, np.nan, 0.3, np.nan])
  classes = ["GLCM", "GLCM", "GLCM", "ID", "ID", "ID", "NID"]
  s = concordance.class_summary(values, classes)
  assert list(s) == ["GLCM", "ID", "NID"]
  mean, std, n = s["GLCM"]
  assert (mean, n) == (pytest.approx(0.8), 3) and std == pytest.approx(np.sqrt(0.08 / 3))
  assert s["ID"] == (pytest.approx(0.4), pytest.approx(0.1), 2)
  assert math.isnan(s["NID"][0]) and s["NID"][2] == 0
  assert concordance.class_summary(values, classes, ddof=1)["GLCM"][1] == pytest.approx(0.2)
  table = concordance.format_summary(s, order=["ID", "GLCM"])
  assert "| ID | 0.40 ± 0.10 | 2 |" in table and "| GLCM | 0.80 ± 0.16 | 3 |" in table
  with pytest.raises(ValueError, match="2 class labels for ccc_per_feature of 7"):
    concordance.class_summary(values, ["a", "b"])


def test_groupwise_ccc():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(30, 4)) * [1, 1000, 1, 1]
  classes = ["A", "A", "B", "B"]
  perfect = concordance.groupwise_ccc(x, x, classes)
  assert perfect == {"A": pytest.approx(1.0), "B": pytest.approx(1.0)}
  y = x + [0, 0, 0.5, 0.5]
  g = concordance.groupwise_ccc(x, y, classes)
  assert g["A"] == pytest.approx(1.0) and g["B"] < 0.99
  # standardised, the large-unit feature does not swamp its class
  noisy = x + rng.normal(size=x.shape) * [1, 0, 0, 0]
  assert concordance.groupwise_ccc(x, noisy, classes)["A"] < 0.9
  assert concordance.groupwise_ccc(x, noisy, classes, standardise=False)["A"] > 0.999
  x[:, 3] = y[:, 3] = 2.0
  with pytest.warns(concordance.ConstantFeatureWarning, match="f3"):
    g = concordance.groupwise_ccc(x, y, classes, names=["f0", "f1", "f2", "f3"])
  assert g["B"] < 1.0
