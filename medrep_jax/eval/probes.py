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
* ``sgd_linear_probe``: the papers' linear-evaluation protocol (a linear layer
  trained by mini-batch SGD with momentum over a grid of learning rates, the LR
  chosen on a validation split); returns an ``SGDProbe`` that scores any split.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

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


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std (+ eps) of the train features."""
  return x.mean(axis=0), x.std(axis=0) + _STD_EPS


def _softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64 (max-subtracted, so large logits do not overflow)."""
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(axis=1, keepdims=True)


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
  mean, std = _standardizer(xtr)
  xtr, xte = (xtr - mean) / std, (xte - mean) / std
  params = _fit_logreg(jnp.asarray(xtr), jnp.asarray(ytr, jnp.int32),
                       jax.random.key(seed), jnp.float32(weight_decay),
                       num_classes=num_classes, max_steps=epochs)
  w, b = np.asarray(params["w"]), np.asarray(params["b"])

  def probs(x: np.ndarray) -> np.ndarray:
    return _softmax(x @ w + b)

  test = metrics.classification_metrics(probs(xte), yte, num_classes)
  train_acc = float((probs(xtr).argmax(axis=1) == ytr).mean())
  return {"accuracy": test["accuracy"], "auc": test["auc"], "train_accuracy": train_acc}


# Default LR grid of `sgd_linear_probe`: half-decade steps over the range where SGD with
# momentum 0.9 on standardized features (unit variance per dimension) goes from slow to
# the edge of divergence for batch 40.
SGD_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclasses.dataclass(frozen=True)
class SGDProbe:
  """A linear softmax classifier on standardized features, chosen by `sgd_linear_probe`.

  Attributes:
    w: (D, K) weights; b: (K,) bias (applied to standardized features).
    mean, std: (D,) the train split's standardization statistics.
    lr: the chosen learning rate.
    num_classes: K.
    val_scores: {lr: {"accuracy", "auc", "loss"}} on the validation split, one entry per
      grid LR (a diverged run scores accuracy 0, auc and loss NaN, ``diverged`` 1).
    train_accuracy: the chosen probe's accuracy on its own training features.
  """
  w: np.ndarray
  b: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  lr: float
  num_classes: int
  val_scores: dict[float, dict[str, float]]
  train_accuracy: float

  def predict_proba(self, feats: Any) -> np.ndarray:
    """(M, K) class probabilities of raw (unstandardized) features."""
    x = (np.asarray(feats, np.float32) - self.mean) / self.std
    return _softmax(x @ self.w + self.b)

  def predict(self, feats: Any) -> np.ndarray:
    return self.predict_proba(feats).argmax(axis=1)

  def score(self, feats: Any, labels: Any) -> dict[str, float]:
    """``accuracy`` and ``auc`` (binary, or macro one-vs-rest) on any split."""
    y = np.asarray(labels).astype(np.int64)
    got = metrics.classification_metrics(self.predict_proba(feats), y, self.num_classes)
    return {"accuracy": got["accuracy"], "auc": got["auc"]}


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit_sgd_grid(x: jax.Array, y: jax.Array, key: jax.Array, lrs: jax.Array,
                  momentum: jax.Array, weight_decay: jax.Array, *, num_classes: int,
                  epochs: int, batch_size: int) -> dict[str, jax.Array]:
  """Mini-batch SGD on the mean cross-entropy, one run per LR (vmapped, one compile).

  Every LR sees the same initialization and the same per-epoch shuffles. An epoch is
  ceil(N / batch_size) steps over a fresh permutation; the last, partial batch is padded
  and its padding masked out of the mean (PyTorch's DataLoader with drop_last=False).
  Weight decay (`optax.add_decayed_weights`, before the momentum trace, as in
  `torch.optim.SGD`) touches the weights, not the bias.
  """
  n, dim = x.shape
  steps = math.ceil(n / batch_size)
  init_key, shuffle_key = jax.random.split(key)
  params0 = {"w": 0.01 * jax.random.normal(init_key, (dim, num_classes), x.dtype),
             "b": jnp.zeros((num_classes,), x.dtype)}
  pad = steps * batch_size - n

  def batch_loss(params, idx, mask):
    logits = x[idx] @ params["w"] + params["b"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx])
    return jnp.sum(mask * xent) / jnp.sum(mask)

  def run(lr):
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask={"w": True, "b": False}),
        optax.sgd(lr, momentum=momentum))

    def epoch(carry, e):
      params, state = carry
      perm = jax.random.permutation(jax.random.fold_in(shuffle_key, e), n)
      order = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
      valid = jnp.concatenate([jnp.ones((n,), x.dtype), jnp.zeros((pad,), x.dtype)])

      def step(i, carry):
        params, state = carry
        idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
        mask = jax.lax.dynamic_slice_in_dim(valid, i * batch_size, batch_size)
        grads = jax.grad(batch_loss)(params, idx, mask)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      return jax.lax.fori_loop(0, steps, step, (params, state)), None

    (params, _), _ = jax.lax.scan(epoch, (params0, tx.init(params0)), jnp.arange(epochs))
    return params

  return jax.vmap(run)(lrs)


def sgd_linear_probe(train_x: Any, train_y: Any, val_x: Any, val_y: Any, *,
                     lrs: Sequence[float] = SGD_LRS, epochs: int = 60, batch_size: int = 40,
                     momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                     standardize: bool = True, num_classes: int | None = None) -> SGDProbe:
  """Linear evaluation by SGD over an LR grid, the LR chosen on the validation split.

  The papers' linear-evaluation protocol (project issue 17: SGD, momentum 0.9, weight
  decay 0, 60 epochs, batch 40, the LR from a grid by validation). Features are
  standardized with the TRAIN split's per-dimension mean and std (``standardize=False``:
  mean 0, std 1). For each LR in ``lrs`` a linear softmax classifier is trained on the
  train features (all LRs in one jitted, vmapped loop, with the same seeded
  initialization and per-epoch shuffles); each is scored on the validation features, and
  the LR of the highest validation accuracy wins, ties broken by the higher validation
  AUC, then by the smaller LR. Runs that diverge (non-finite weights) are never chosen.

  The held-out test split is deliberately not an argument: selection sees train and val
  only; score the test split afterwards with ``probe.score(test_x, test_y)``.

  Args:
    train_x: (N, D) training features; train_y: (N,) integer labels.
    val_x: (M, D) validation features; val_y: (M,) integer labels.
    lrs: the learning-rate grid (positive).
    epochs: passes over the training features.
    batch_size: examples per SGD step (the last batch of an epoch may be smaller).
    momentum: heavy-ball momentum (``optax.sgd``, as ``torch.optim.SGD``).
    weight_decay: L2 coefficient on the weights (``optax.add_decayed_weights``); 0 = off.
    seed: seeds the initialization and the shuffles.
    standardize: standardize features with the train statistics.
    num_classes: K >= 2; defaults to 1 + the largest label seen (at least 2).

  Returns:
    The chosen ``SGDProbe`` (weights, standardization, ``lr``, per-LR ``val_scores``).
  """
  xtr, ytr, xva, yva, num_classes = _check_split(train_x, train_y, val_x, val_y,
                                                  num_classes)
  num_classes = max(num_classes, 2)
  lrs = tuple(float(lr) for lr in lrs)
  if not lrs or min(lrs) <= 0:
    raise ValueError(f"lrs must be a non-empty grid of positive learning rates; got {lrs}")
  if epochs < 1 or batch_size < 1:
    raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")
  if standardize:
    mean, std = _standardizer(xtr)
  else:
    mean, std = np.zeros(xtr.shape[1], np.float32), np.ones(xtr.shape[1], np.float32)
  mean, std = mean.astype(np.float32), std.astype(np.float32)
  params = _fit_sgd_grid(jnp.asarray((xtr - mean) / std), jnp.asarray(ytr, jnp.int32),
                         jax.random.key(seed), jnp.asarray(lrs, jnp.float32),
                         jnp.float32(momentum), jnp.float32(weight_decay),
                         num_classes=num_classes, epochs=int(epochs),
                         batch_size=min(int(batch_size), xtr.shape[0]))
  ws, bs = np.asarray(params["w"]), np.asarray(params["b"])
  candidates = []
  for i, lr in enumerate(lrs):
    probe = SGDProbe(ws[i], bs[i], mean, std, lr, num_classes, {}, float("nan"))
    if not (np.isfinite(ws[i]).all() and np.isfinite(bs[i]).all()):
      candidates.append({"accuracy": 0.0, "auc": float("nan"), "loss": float("nan"),
                         "diverged": 1.0})
      continue
    p = probe.predict_proba(xva)
    scores = probe.score(xva, yva)
    loss = float(-np.log(np.maximum(p[np.arange(len(yva)), yva], 1e-12)).mean())
    candidates.append({**scores, "loss": loss, "diverged": 0.0})
  finite = [i for i, s in enumerate(candidates) if not s["diverged"]]
  if not finite:
    raise ValueError(f"every SGD probe diverged (lrs={lrs}); use smaller learning rates")

  def rank(i):  # larger is better: accuracy, then AUC (NaN lowest), then the smaller LR
    auc = candidates[i]["auc"]
    return (candidates[i]["accuracy"], -math.inf if math.isnan(auc) else auc, -lrs[i])

  best = max(finite, key=rank)
  w, b = ws[best], bs[best]
  train_acc = float((_softmax(((xtr - mean) / std) @ w + b).argmax(axis=1) == ytr).mean())
  return SGDProbe(w, b, mean, std, lrs[best], num_classes,
                  {lr: s for lr, s in zip(lrs, candidates)}, train_acc)
