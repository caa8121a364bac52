"""Tests for the kNN and linear-probe representation monitors."""
import inspect

import numpy as np
import pytest

from medrep_jax.eval import probes


def _clusters(rng: np.random.Generator, n: int, dim: int = 16, classes: int = 3,
              spread: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian blobs around well-separated random unit centres."""
  centres = rng.normal(size=(classes, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  labels = rng.integers(0, classes, n)
  feats = centres[labels] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
  return feats.astype(np.float32), labels


def test_knn_separated_clusters_is_perfect():
  rng = np.random.default_rng(0)
  xtr, ytr = _clusters(rng, 200)
  xte, yte = _clusters(np.random.default_rng(0), 200)  # same centres
  xte, yte = xte[100:], yte[100:]
  assert probes.knn_accuracy(xtr, ytr, xte, yte, k=20) == 1.0


def test_knn_random_labels_near_chance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(900, 8)).astype(np.float32)
  y = rng.integers(0, 4, 900)
  acc = probes.knn_accuracy(x[:600], y[:600], x[600:], y[600:], k=20)
  assert 0.15 < acc < 0.35


def test_knn_k1_matches_numpy_nearest_neighbour():
  rng = np.random.default_rng(2)
  xtr = rng.normal(size=(150, 6)).astype(np.float32)
  ytr = rng.integers(0, 5, 150)
  xte = rng.normal(size=(70, 6)).astype(np.float32)
  yte = rng.integers(0, 5, 70)
  a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
  b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
  ref = float((ytr[np.argmax(b @ a.T, axis=1)] == yte).mean())
  got = probes.knn_accuracy(xtr, ytr, xte, yte, k=1, num_classes=5)
  assert got == pytest.approx(ref)


def test_knn_chunking_and_ties(monkeypatch):
  rng = np.random.default_rng(3)
  xtr = rng.normal(size=(40, 4)).astype(np.float32)
  ytr = rng.integers(0, 3, 40)
  xte = rng.normal(size=(25, 4)).astype(np.float32)
  yte = rng.integers(0, 3, 25)
  full = probes.knn_accuracy(xtr, ytr, xte, yte, k=5)
  monkeypatch.setattr(probes, "_KNN_CHUNK_ELEMENTS", 7 * 40)  # 4 chunks
  assert probes.knn_accuracy(xtr, ytr, xte, yte, k=5) == full
  # Duplicated training points tie exactly; exactly k per row, lowest index first.
  sim = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
  np.testing.assert_array_equal(probes._top_k_mask(sim, 3), [[1, 1, 1, 0, 0]])


def test_linear_probe_separable_and_random():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(10, 3))
  x = rng.normal(size=(600, 10)).astype(np.float32)
  y = np.argmax(x @ w, axis=1)
  out = probes.linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=100)
  assert out["accuracy"] >= 0.95
  assert out["train_accuracy"] >= 0.95
  assert out["auc"] > 0.98
  y_rand = rng.integers(0, 2, 600)
  out = probes.linear_probe(x[:400], y_rand[:400], x[400:], y_rand[400:], epochs=100)
  assert 0.38 < out["accuracy"] < 0.62
  assert 0.35 < out["auc"] < 0.65


def test_linear_probe_deterministic():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(120, 5)).astype(np.float32)
  y = rng.integers(0, 3, 120)
  a = probes.linear_probe(x[:80], y[:80], x[80:], y[80:], epochs=20, seed=3)
  b = probes.linear_probe(x[:80], y[:80], x[80:], y[80:], epochs=20, seed=3)
  assert a == b


@pytest.mark.parametrize("fn", [probes.knn_accuracy, probes.linear_probe])
def test_bad_shapes_raise(fn):
  x, y = np.zeros((10, 4), np.float32), np.zeros(10, np.int64)
  with pytest.raises(ValueError, match=r"\(5, 3\)"):
    fn(x, y, np.zeros((5, 3), np.float32), np.zeros(5, np.int64))
  with pytest.raises(ValueError, match=r"\(9,\)"):
    fn(x, np.zeros(9, np.int64), x, y)
  with pytest.raises(ValueError, match=r"\(10,\)"):
    fn(x[:, 0], y, x, y)


def _separable(seed: int, n: int, dim: int = 10, classes: int = 3):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, classes))
  x = rng.normal(size=(n, dim)).astype(np.float32)
  return x, np.argmax(x @ w, axis=1)


def test_sgd_probe_separates_a_linearly_separable_set():
  x, y = _separable(4, 600)
  probe = probes.sgd_linear_probe(x[:300], y[:300], x[300:450], y[300:450], epochs=20)
  assert set(probe.val_scores) == set(probes.SGD_LRS)
  assert probe.lr in probes.SGD_LRS
  assert probe.train_accuracy >= 0.95
  test = probe.score(x[450:], y[450:])
  assert test["accuracy"] >= 0.93 and test["auc"] > 0.98
  # The chosen probe's val accuracy is what the selection recorded for its LR.
  assert probe.score(x[300:450], y[300:450])["accuracy"] == pytest.approx(
      probe.val_scores[probe.lr]["accuracy"])
  np.testing.assert_array_equal(probe.predict(x[450:]),
                                probe.predict_proba(x[450:]).argmax(axis=1))


def test_sgd_lr_selection_uses_only_the_validation_split():
  """Train accuracy would pick the large LR for both val sets; the choice follows val."""
  names = set(inspect.signature(probes.sgd_linear_probe).parameters)
  assert not any("test" in name for name in names)  # the test split cannot be passed in
  x, y = _separable(6, 400)
  xtr, ytr, xva, yva = x[:250], y[:250], x[250:], y[250:]
  lrs = (1e-5, 1.0)  # 1e-5: the weights barely leave their tiny random init
  kw = dict(lrs=lrs, epochs=5, seed=1)
  honest = probes.sgd_linear_probe(xtr, ytr, xva, yva, **kw)
  assert honest.lr == 1.0 and honest.val_scores[1.0]["accuracy"] >= 0.9
  # Val labels shifted by one class: the well-trained probe is now almost always wrong,
  # so the untrained one (about chance) wins on validation.
  shifted = probes.sgd_linear_probe(xtr, ytr, xva, (yva + 1) % 3, **kw)
  assert shifted.lr == 1e-5
  assert shifted.val_scores[1.0]["accuracy"] < 0.1
  assert shifted.val_scores[1e-5]["accuracy"] > shifted.val_scores[1.0]["accuracy"]
  # Same train set, same per-LR training: only the val scores moved.
  assert honest.val_scores[1.0]["accuracy"] != shifted.val_scores[1.0]["accuracy"]
  # Identical inputs: the same choice, weights and scores.
  again = probes.sgd_linear_probe(xtr, ytr, xva, (yva + 1) % 3, **kw)
  assert again.lr == shifted.lr and again.val_scores == shifted.val_scores
  np.testing.assert_array_equal(again.w, shifted.w)


def test_sgd_probe_ties_pick_the_smaller_lr_and_bad_input_raises():
  x, y = _separable(7, 200)
  # One val point per class, trivially right for every LR: accuracy and AUC tie.
  keep = np.array([np.flatnonzero(y[100:] == k)[0] for k in range(3)]) + 100
  probe = probes.sgd_linear_probe(x[:100], y[:100], x[keep], y[keep], lrs=(1.0, 0.3),
                                  epochs=20)
  assert probe.val_scores[1.0]["accuracy"] == probe.val_scores[0.3]["accuracy"] == 1.0
  assert probe.lr == 0.3
  with pytest.raises(ValueError, match="positive"):
    probes.sgd_linear_probe(x, y, x, y, lrs=())
  with pytest.raises(ValueError, match=r"\(5, 3\)"):
    probes.sgd_linear_probe(x, y, np.zeros((5, 3), np.float32), np.zeros(5, np.int64))
