"""t-SNE (eval.embedding) and the embedding figure."""
import numpy as np
import pytest

from medrep_jax.eval import embedding
from medrep_jax.eval import figures


def _blobs(seed: int = 0, per_class: int = 20, dim: int = 20):
  """Three well-separated Gaussian clusters in `dim` dimensions."""
  rng = np.random.default_rng(seed)
  centres = 3.0 * rng.normal(size=(3, dim))
  labels = np.repeat(np.arange(3), per_class)
  return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def _knn_accuracy(points: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
  """Leave-one-out kNN: the fraction of each point's k nearest neighbours sharing its label."""
  d = ((points[:, None] - points[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  nearest = np.argsort(d, axis=1)[:, :k]
  return float((labels[nearest] == labels[:, None]).mean())


def test_tsne_keeps_separated_clusters_apart_and_is_deterministic():
  x, labels = _blobs()
  y = embedding.tsne(x, perplexity=10, iterations=300, seed=0)
  assert y.shape == (60, 2) and np.isfinite(y).all()
  assert _knn_accuracy(y, labels) == 1.0
  centres = np.stack([y[labels == k].mean(axis=0) for k in range(3)])
  spread = max(np.linalg.norm(y[labels == k] - centres[k], axis=1).max() for k in range(3))
  gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i)]
  assert min(gaps) > 2 * spread  # every cluster lies inside a disc clear of the others
  np.testing.assert_array_equal(y, embedding.tsne(x, perplexity=10, iterations=300, seed=0))
  assert not np.array_equal(y, embedding.tsne(x, perplexity=10, iterations=300, seed=1))


@pytest.mark.parametrize("perplexity", [5.0, 30.0])
def test_perplexity_calibration_hits_the_target_entropy(perplexity):
  x, _ = _blobs(seed=1, per_class=40)
  d = embedding.squared_distances(x)
  p, beta = embedding.conditional_probabilities(d, perplexity)
  # NumPy reference: rebuild each row from its beta and measure its entropy (nats).
  for i in range(len(x)):
    others = np.delete(np.arange(len(x)), i)
    row = np.exp(-beta[i] * (d[i, others] - d[i, others].min()))
    row /= row.sum()
    np.testing.assert_allclose(p[i, others], row, rtol=1e-6, atol=1e-12)
    entropy = -(row * np.log(row + 1e-300)).sum()
    assert entropy == pytest.approx(np.log(perplexity), abs=1e-4)
  assert np.allclose(np.diag(p), 0.0) and np.allclose(p.sum(axis=1), 1.0)
  joint = embedding.joint_probabilities(x, perplexity)
  np.testing.assert_allclose(joint, joint.T)
  assert joint.sum() == pytest.approx(1.0, abs=1e-6)


def test_tsne_bad_input_raises():
  with pytest.raises(ValueError, match="N >= 4"):
    embedding.tsne(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="NaN"):
    embedding.tsne(np.full((10, 5), np.nan))


def test_embedding_figure_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  path = figures.embedding_figure(rng.normal(size=(30, 2)), np.arange(30) % 3,
                                  ("normal", "drusen"), tmp_path / "figs" / "emb.png",
                                  title="t-SNE")
  assert path == str(tmp_path / "figs" / "emb.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match=r"\(N, 2\)"):
    figures.embedding_figure(np.zeros((4, 3)), np.zeros(4), (), tmp_path / "x.png")
