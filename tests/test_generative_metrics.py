"""Frechet distance, KID and bootstrap intervals against closed forms."""
import numpy as np
import pytest

from medrep_jax.eval import generative as gen


def test_frechet_distance_closed_form_for_diagonal_gaussians():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
  want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = gen.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_samples():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 4))
  b = rng.normal(size=(4000, 4)) + np.array([2.0, 0, 0, 0])
  assert gen.fd(a, a) == pytest.approx(0.0, abs=1e-6)
  assert gen.fd(a, b) == pytest.approx(4.0, abs=0.2)


def test_mmd_matches_bruteforce_and_kid_is_near_zero_for_same_distribution():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(30, 5)), rng.normal(size=(40, 5)) + 0.5
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  xx = np.mean([k(x[i], x[j]) for i in range(30) for j in range(30) if i != j])
  yy = np.mean([k(y[i], y[j]) for i in range(40) for j in range(40) if i != j])
  xy = np.mean([k(x[i], y[j]) for i in range(30) for j in range(40)])
  assert gen.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
  same = gen.kid(rng.normal(size=(500, 5)), rng.normal(size=(500, 5)), subset_size=200)
  shifted = gen.kid(rng.normal(size=(500, 5)), rng.normal(size=(500, 5)) + 1.0,
                    subset_size=200)
  assert abs(same) < 0.02 < shifted


def test_bootstrap_interval_brackets_the_estimate():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(300, 3)), rng.normal(size=(300, 3)) + 1.0
  out = gen.generative_metrics(a, b, label="test features", num_boot=20)
  assert out["feature_net"] == "test features"
  assert out["fd_lo"] <= out["fd"] <= out["fd_hi"]
  assert out["kid_lo"] <= out["kid_hi"]
  with pytest.raises(ValueError, match="shape"):
    gen.gaussian_stats(np.zeros((1, 3)))
