"""Tests for the kNN and linear-probe representation monitors."""
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
