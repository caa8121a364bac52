"""Representation-quality monitors: weighted kNN and a linear probe.

Both take host-side NumPy feature arrays (e.g. encoder outputs gathered at the
end of a pretraining epoch) and return plain Python floats, so they can be
logged to ``metrics.jsonl`` next to the training loss.

* ``knn_accuracy``: cosine-similarity kNN with similarity-weighted voting,
  each of the k neighbours voting exp(s / tau) for its label (Wu et al. 2018,
  "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
  Eq. 8; the monitor DINO uses with k=20, tau=0.07).
* ``linear_probe``: multinomial logistic regression on standardized features,
  trained full batch with L-BFGS (``optax.lbfgs``) inside one jitted loop.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.eval import metrics

# Upper bound on the number of similarity entries held at once by the kNN.
_KNN_CHUNK_ELEMENTS = 1 << 22
_STD_EPS = 1e-6
_GRAD_TOL = 1e-6


def _check_split(train_feats: Any, train_labels: Any, test_feats: Any, test_labels: Any,
                 num_classes: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray, int]:
  """Validates shapes and labels; returns float/int arrays and num_classes."""
  xtr, ytr = np.asarray(train_feats), np.asarray(train_labels)
  xte, yte = np.asarray(test_feats), np.asarray(test_labels)
  shapes = (f"train_feats {xtr.shape}, train_labels {ytr.shape}, "
            f"test_feats {xte.shape}, test_labels {yte.shape}")
  if xtr.ndim != 2 or xte.ndim != 2 or ytr.ndim != 1 or yte.ndim != 1:
    raise ValueError(f"expected (N, D), (N,), (M, D), (M,) arrays; got {shapes}")
  if (xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]
      or xtr.shape[1] != xte.shape[1]):
    raise ValueError(f"inconsistent shapes: {shapes}")
  if xtr.shape[0] == 0 or xte.shape[0] == 0:
    raise ValueError(f"empty train or test split: {shapes}")
  if not (np.issubdtype(ytr.dtype, np.integer) and np.issubdtype(yte.dtype, np.integer)):
    raise ValueError(f"labels must be integers; got {ytr.dtype}, {yte.dtype}")
  if num_classes is None:
    num_classes = int(max(ytr.max(), yte.max())) + 1
  lo, hi = min(ytr.min(), yte.min()), max(ytr.max(), yte.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}); got range [{lo}, {hi}]")
  return (xtr.astype(np.float32), ytr.astype(np.int64), xte.astype(np.float32),
          yte.astype(np.int64), num_classes)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def _top_k_mask(sim: np.ndarray, k: int) -> np.ndarray:
  """(C, N) bool mask of exactly k entries per row: the k largest similarities.

  Ties at the k-th value go to the lowest training index, so the result does
  not depend on the selection algorithm.
  """
  n = sim.shape[1]
  kth = np.partition(sim, n - k, axis=1)[:, n - k:n - k + 1]
  above = sim > kth
  equal = sim == kth
  room = k - above.sum(axis=1, keepdims=True)
  return above | (equal & (np.cumsum(equal, axis=1) <= room))


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray,
                 test_feats: np.ndarray, test_labels: np.ndarray, *,
                 k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> float:
  """Top-1 accuracy of a similarity-weighted cosine kNN classifier.

  Features are l2-normalized; each test point takes the k training points of
  highest cosine similarity s_i, and class c scores sum_i exp(s_i / tau) over
  neighbours labelled c (Wu et al. 2018, Eq. 8). The prediction is the
  highest-scoring class, the lowest class index on a tie. The (M, N)
  similarity matrix is built in row chunks of at most ~4M entries.

  Args:
    train_feats: (N, D) features of the labelled bank.
    train_labels: (N,) integer labels.
    test_feats: (M, D) features to classify.
    test_labels: (M,) integer labels.
    k: neighbours per test point; clipped to N.
    temperature: tau in exp(s / tau).
    num_classes: K; defaults to 1 + the largest label seen.

  Returns:
    Fraction of test points classified correctly.
  """
  xtr, ytr, xte, yte, num_classes = _check_split(
      train_feats, train_labels, test_feats, test_labels, num_classes)
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")
  n = xtr.shape[0]
  k = min(k, n)
  xtr, xte = _l2_normalize(xtr), _l2_normalize(xte)
  onehot = np.eye(num_classes, dtype=np.float64)[ytr]  # (N, K)
  chunk = max(1, _KNN_CHUNK_ELEMENTS // n)
  correct = 0
  for start in range(0, xte.shape[0], chunk):
    sim = xte[start:start + chunk] @ xtr.T  # (C, N)
    mask = _top_k_mask(sim, k)
    # exp((s - 1) / tau): same ranking as exp(s / tau), no overflow for s <= 1.
    weights = np.where(mask, np.exp((sim.astype(np.float64) - 1.0) / temperature), 0.0)
    preds = (weights @ onehot).argmax(axis=1)
    correct += int((preds == yte[start:start + chunk]).sum())
  return correct / xte.shape[0]


def _xent_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array,
               weight_decay: float) -> jax.Array:
  """Mean softmax cross-entropy plus (weight_decay / 2) ||W||^2 (bias free)."""
  logits = x @ params["w"] + params["b"]
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return xent + 0.5 * weight_decay * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit_logreg(x: jax.Array, y: jax.Array, key: jax.Array, weight_decay: jax.Array, *,
                num_classes: int, max_steps: int) -> dict[str, jax.Array]:
  """L-BFGS on the regularized cross-entropy, stopping early at a tiny gradient."""
  params = {"w": 0.01 * jax.random.normal(key, (x.shape[1], num_classes), x.dtype),
            "b": jnp.zeros((num_classes,), x.dtype)}
  fun = functools.partial(_xent_loss, x=x, y=y, weight_decay=weight_decay)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state, i, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state, i + 1, optax.tree.norm(grad)

  def keep_going(carry):
    _, _, i, grad_norm = carry
    return (i < max_steps) & (grad_norm > _GRAD_TOL)

  init = (params, opt.init(params), jnp.asarray(0), jnp.asarray(jnp.inf, x.dtype))
  return jax.lax.while_loop(keep_going, step, init)[0]


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray,
                 test_feats: np.ndarray, test_labels: np.ndarray, *,
                 num_classes: int | None = None, epochs: int = 100,
                 weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
  """Fits multinomial logistic regression on frozen features and scores it.

  Features are standardized with the train split's per-dimension mean and
  std. The probe minimizes mean cross-entropy + (weight_decay / 2) ||W||^2
  full batch with L-BFGS and a zoom line search, so no learning rate is needed.

  Args:
    train_feats: (N, D) training features.
    train_labels: (N,) integer labels.
    test_feats: (M, D) evaluation features.
    test_labels: (M,) integer labels.
    num_classes: K >= 2; defaults to 1 + the largest label seen (at least 2).
    epochs: maximum number of full-batch L-BFGS iterations.
    weight_decay: L2 coefficient on the weights (not the bias).
    seed: seeds the small random initialization of the weights.

  Returns:
    ``accuracy`` and ``auc`` on the test split (binary ROC AUC for K = 2,
    macro one-vs-rest otherwise, via ``metrics.classification_metrics``) and
    ``train_accuracy``.
  """
  xtr, ytr, xte, yte, num_classes = _check_split(
      train_feats, train_labels, test_feats, test_labels, num_classes)
  num_classes = max(num_classes, 2)
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1; got {epochs}")
  mean = xtr.mean(axis=0)
  std = xtr.std(axis=0) + _STD_EPS
  xtr, xte = (xtr - mean) / std, (xte - mean) / std
  params = _fit_logreg(jnp.asarray(xtr), jnp.asarray(ytr, jnp.int32),
                       jax.random.key(seed), jnp.float32(weight_decay),
                       num_classes=num_classes, max_steps=epochs)
  w, b = np.asarray(params["w"]), np.asarray(params["b"])

  def probs(x: np.ndarray) -> np.ndarray:
    logits = (x @ w + b).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)

  test = metrics.classification_metrics(probs(xte), yte, num_classes)
  train_acc = float((probs(xtr).argmax(axis=1) == ytr).mean())
  return {"accuracy": test["accuracy"], "auc": test["auc"], "train_accuracy": train_acc}
