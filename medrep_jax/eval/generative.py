"""Frechet distance and KID between real and generated feature sets, with bootstrap CIs.

The feature network is pluggable (see `medrep_jax/eval/feature_nets.py`): every function
here takes plain (N, D) feature arrays. Reported names carry the feature network's label,
because a Frechet distance is only comparable within one feature space.

References: Heusel et al., 2017 (FID); Binkowski et al., 2018 (KID, unbiased MMD² with the
cubic polynomial kernel k(x, y) = (x·y / d + 1)³).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of (N, D) features, in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) (Frechet distance of two Gaussians)."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  covmean = np.real(covmean)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fd(real: np.ndarray, fake: np.ndarray) -> float:
  """Frechet distance between two (N, D) feature sets."""
  return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD² with the cubic polynomial kernel (one KID subset)."""
  m, n = len(x), len(y)
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 50,
        subset_size: int = 1000, seed: int = 0) -> float:
  """Kernel Inception Distance: the mean unbiased MMD² over random subsets."""
  real = np.asarray(real, np.float64)
  fake = np.asarray(fake, np.float64)
  size = min(subset_size, len(real), len(fake))
  if size < 2:
    raise ValueError(f"KID needs at least 2 examples per set, got {len(real)}, {len(fake)}")
  rng = np.random.default_rng(seed)
  vals = [mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                        fake[rng.choice(len(fake), size, replace=False)])
          for _ in range(num_subsets)]
  return float(np.mean(vals))


def bootstrap(stat: Callable[[np.ndarray, np.ndarray], float], real: np.ndarray,
              fake: np.ndarray, *, num_boot: int = 100, alpha: float = 0.05,
              seed: int = 0) -> tuple[float, float, float]:
  """(point estimate, lower, upper): a normal-approximation bootstrap interval.

  Both sets are resampled with replacement and the interval is θ ± z·sd(bootstrap), with
  z for `alpha`. Percentile intervals are not used: resampling duplicates examples, which
  inflates FD, so the whole bootstrap distribution can sit above the estimate and a
  percentile (or basic) interval would exclude the estimate itself. The lower bound is
  clipped at 0 for FD-like statistics that cannot be negative.
  """
  from scipy.stats import norm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  point = stat(real, fake)
  boots = [stat(real[rng.integers(0, len(real), len(real))],
                fake[rng.integers(0, len(fake), len(fake))]) for _ in range(num_boot)]
  half = float(norm.ppf(1 - alpha / 2) * np.std(boots, ddof=1))
  return float(point), float(max(point - half, 0.0)), float(point + half)


def generative_metrics(real: np.ndarray, fake: np.ndarray, *, label: str,
                       num_boot: int = 50, seed: int = 0) -> dict[str, float | str]:
  """FD and KID with 95% bootstrap intervals, keyed `fd`, `fd_lo`, `fd_hi`, `kid`, ...

  Args:
    real, fake: (N, D) features of real and generated images.
    label: the feature network, recorded as `feature_net` (e.g. "LDM VAE encoder
      (trained by medrep_jax)"); FD values are comparable only within one label.
    num_boot: bootstrap resamples (0 skips the intervals).
    seed: resampling seed.
  """
  out: dict[str, float | str] = {"feature_net": label}
  subset = min(1000, len(real), len(fake))
  kid_fn = lambda a, b: kid(a, b, num_subsets=10, subset_size=subset, seed=seed)
  for name, fn in (("fd", fd), ("kid", kid_fn)):
    if num_boot:
      out[name], out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap(
          fn, real, fake, num_boot=num_boot, seed=seed)
    else:
      out[name] = fn(real, fake)
  return out
