"""2-D embeddings of frozen features for figures: exact-gradient t-SNE.

t-SNE (van der Maaten & Hinton 2008, "Visualizing Data using t-SNE", JMLR 9) places N
points in 2-D so that the Student-t similarities Q of the map match the Gaussian
similarities P of the features, minimizing KL(P || Q):

* P: each point's conditional p_{j|i} ~ exp(-||x_i - x_j||^2 beta_i) with beta_i found by
  binary search so that the row's entropy is log(perplexity) (Sec. 2), then symmetrized,
  p_ij = (p_{j|i} + p_{i|j}) / 2N (Sec. 3.1).
* Q: q_ij ~ (1 + ||y_i - y_j||^2)^-1 over all pairs i != j (Sec. 3.2), with the gradient
  dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j)(1 + ||y_i - y_j||^2)^-1 (Eq. 5).
* Optimization (Sec. 3.4): features reduced to 50 dims by PCA (the paper's experiments
  use 30; 50 is the common default since), map initialized from
  N(0, 1e-4 I), gradient descent with momentum 0.5 then 0.8, per-parameter adaptive gains
  (Jacobs 1988, as in the authors' reference implementation), and early exaggeration
  (P multiplied by 12 for the first 250 iterations, the values of later implementations;
  the paper used 4 for 50).
  The learning rate is N / 12 (Belkina et al. 2019, "Automated optimized parameters for
  t-SNE", Nat. Commun.: N / exaggeration), at least 1. The common floor of 50 (sklearn's
  "auto") is not used: with 12x exaggeration it overshoots for N < 600, and at N = 60 a few
  seeds still had a point flung out of its cluster after 300 iterations.

The gradient is exact (O(N^2) memory and time per iteration), which suits up to a few
thousand points; the whole descent is one jitted `lax.fori_loop`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PCA_DIMS = 50
EXAGGERATION = 12.0
EXAGGERATION_ITERATIONS = 250
MOMENTUM_EARLY, MOMENTUM_LATE = 0.5, 0.8
MIN_GAIN = 0.01
_P_FLOOR = 1e-12


def pca(x: np.ndarray, dims: int = PCA_DIMS) -> np.ndarray:
  """The centred features projected on their top `dims` principal axes (as is if D <= dims)."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  if x.shape[1] <= dims:
    return x
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  return u[:, :dims] * s[:dims]


def squared_distances(x: np.ndarray) -> np.ndarray:
  """(N, N) squared Euclidean distances, clipped at 0, zero diagonal."""
  x = np.asarray(x, np.float64)
  sq = (x * x).sum(axis=1)
  d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  np.fill_diagonal(d, 0.0)
  return d


def conditional_probabilities(sq_dist: np.ndarray, perplexity: float, *, tol: float = 1e-5,
                              max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
  """Rows p_{j|i} of Gaussian similarities, each with entropy log(perplexity) (nats).

  Binary search on beta_i = 1 / (2 sigma_i^2) for all rows at once: doubling or halving
  until the target is bracketed, then bisecting, until |H_i - log(perplexity)| < tol.

  Args:
    sq_dist: (N, N) squared distances (the diagonal is ignored).
    perplexity: the target perplexity, 1 < perplexity < N - 1.
    tol: tolerance on each row's entropy, in nats.
    max_iter: most search steps.

  Returns:
    (P, beta): (N, N) row-stochastic P with a zero diagonal, and the (N,) betas.
  """
  d = np.array(sq_dist, np.float64)
  n = d.shape[0]
  off = ~np.eye(n, dtype=bool)
  # Shifting each row by its smallest off-diagonal distance leaves the normalized row
  # unchanged and keeps exp() from underflowing to an all-zero row.
  d = d - np.where(off, d, np.inf).min(axis=1, keepdims=True)
  d[~off] = 0.0
  target = np.log(perplexity)
  beta = np.ones(n)
  lo, hi = np.zeros(n), np.full(n, np.inf)

  def rows(beta):
    p = np.where(off, np.exp(-d * beta[:, None]), 0.0)
    p /= p.sum(axis=1, keepdims=True)
    ent = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
    return p, ent

  for _ in range(max_iter):
    p, ent = rows(beta)
    diff = ent - target
    if np.all(np.abs(diff) < tol):
      break
    too_flat = diff > 0  # entropy too high: sharpen (larger beta)
    lo = np.where(too_flat, beta, lo)
    hi = np.where(too_flat, hi, beta)
    beta = np.where(too_flat, np.where(np.isinf(hi), beta * 2.0, (beta + hi) / 2.0),
                    (beta + lo) / 2.0)
  else:
    p, _ = rows(beta)
  return p, beta


def joint_probabilities(features: np.ndarray, perplexity: float) -> np.ndarray:
  """Symmetrized P = (P_cond + P_cond^T) / 2N of the features (floored at 1e-12)."""
  p, _ = conditional_probabilities(squared_distances(features), perplexity)
  p = (p + p.T) / (2.0 * p.shape[0])
  return np.maximum(p, _P_FLOOR)


def _kl_grad(y: jax.Array, p: jax.Array) -> jax.Array:
  """Exact gradient of KL(P || Q) with respect to the map `y` (Eq. 5)."""
  sq = jnp.sum(y * y, axis=1)
  num = 1.0 / (1.0 + jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * y @ y.T, 0.0))
  num = num * (1.0 - jnp.eye(y.shape[0], dtype=y.dtype))
  q = jnp.maximum(num / jnp.sum(num), _P_FLOOR)
  pq = (p - q) * num
  return 4.0 * (jnp.sum(pq, axis=1, keepdims=True) * y - pq @ y)


@functools.partial(jax.jit, static_argnames=("iterations", "exaggeration_iterations"))
def _descend(p: jax.Array, y0: jax.Array, learning_rate: jax.Array, *, iterations: int,
             exaggeration_iterations: int) -> jax.Array:
  """Gradient descent with momentum and adaptive gains, early exaggeration first."""

  def step(i, carry):
    y, update, gains = carry
    early = i < exaggeration_iterations
    grad = _kl_grad(y, jnp.where(early, EXAGGERATION, 1.0) * p)
    momentum = jnp.where(early, MOMENTUM_EARLY, MOMENTUM_LATE)
    same_sign = jnp.sign(grad) == jnp.sign(update)
    gains = jnp.maximum(jnp.where(same_sign, gains * 0.8, gains + 0.2), MIN_GAIN)
    update = momentum * update - learning_rate * gains * grad
    y = y + update
    return y - y.mean(axis=0), update, gains

  init = (y0, jnp.zeros_like(y0), jnp.ones_like(y0))
  return jax.lax.fori_loop(0, iterations, step, init)[0]


def tsne(features: Any, *, perplexity: float = 30.0, iterations: int = 1000,
         seed: int = 0, learning_rate: float | None = None) -> np.ndarray:
  """A 2-D t-SNE map of (N, D) features (van der Maaten & Hinton 2008), exact gradient.

  Features are reduced to 50 dims by PCA, P is calibrated to `perplexity` (clipped to
  (N - 1) / 3 for small N, so every row has enough neighbours), and the map descends
  KL(P || Q) for `iterations` steps: P exaggerated 12x for the first
  min(250, iterations // 4) steps with momentum 0.5, then momentum 0.8; learning rate
  max(N / 12, 1) unless given. Deterministic for a seed (which draws the initial map) on
  a given machine and XLA build (the descent amplifies float rounding differences).

  Args:
    features: (N, D) array, N >= 4 (a few thousand at most: the gradient is O(N^2)).
    perplexity: effective number of neighbours per point.
    iterations: gradient steps.
    seed: seeds the initial map, drawn from N(0, 1e-4 I) (std 0.01).
    learning_rate: the step size; None: max(N / 12, 1).

  Returns:
    (N, 2) float64 map coordinates (centred).
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 4:
    raise ValueError(f"tsne needs (N, D) features with N >= 4; got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("tsne features contain NaN or inf")
  if perplexity <= 1 or iterations < 1:
    raise ValueError(f"perplexity must be > 1 and iterations >= 1; got {perplexity}, "
                     f"{iterations}")
  n = x.shape[0]
  perplexity = min(float(perplexity), (n - 1) / 3.0)
  p = joint_probabilities(pca(x), max(perplexity, 1.01))
  y0 = 1e-2 * np.random.default_rng(seed).standard_normal((n, 2))
  y = _descend(jnp.asarray(p, jnp.float32), jnp.asarray(y0, jnp.float32),
               jnp.float32(learning_rate or max(n / EXAGGERATION, 1.0)),
               iterations=int(iterations),
               exaggeration_iterations=min(EXAGGERATION_ITERATIONS, int(iterations) // 4))
  return np.asarray(y, np.float64)
