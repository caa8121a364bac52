"""Tests for the (block, timestep) pixel feature probe (DSDM Fig. 3)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.eval import feature_probe as fp
from medrep_jax.eval import figures

K = 3  # classes
SIZE = 16  # mask side; features are at half resolution
EXTRA = 4  # pure-noise channels appended to the informative ones
# One shape/config for every fit below, so the jitted loop compiles once for the file.
FIT = dict(hidden=16, steps=200, lr=1e-2, batch_pixels=256)


def _masks(rng: np.random.Generator, n: int) -> np.ndarray:
  """(n, 16, 16) masks constant on 4x4 blocks of random classes."""
  coarse = rng.integers(0, K, (n, SIZE // 4, SIZE // 4))
  return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.int32)


def _onehot_features(rng: np.random.Generator, masks: np.ndarray,
                     noise: float = 0.1) -> np.ndarray:
  """(n, 8, 8, K + EXTRA): noisy one-hot of the half-resolution mask, then noise channels."""
  half = masks[:, ::2, ::2]
  onehot = np.eye(K)[half] + noise * rng.normal(size=half.shape + (K,))
  return np.concatenate([onehot, rng.normal(size=half.shape + (EXTRA,))],
                        axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  m_train, m_test = _masks(rng, 12), _masks(rng, 4)
  return {"m_train": m_train, "m_test": m_test,
          "f_train": _onehot_features(rng, m_train), "f_test": _onehot_features(rng, m_test)}


@pytest.mark.parametrize("kw", [{}, {"hidden": 0}, {"downsample_masks": True}],
                         ids=["mlp", "linear", "downsample_masks"])
def test_probe_segments_informative_half_resolution_features(data, kw):
  probe = fp.fit_pixel_probe(data["f_train"], data["m_train"], K, **{**FIT, **kw})
  scores = fp.probe_miou(probe, data["f_test"], data["m_test"], K)
  assert scores["miou"] >= 0.95, scores
  assert scores["mean_dice"] >= scores["miou"]
  assert set(scores) >= {"miou", "mean_dice", "accuracy", "iou/0", "dice/2"}


def test_probe_stays_near_chance_on_noise_features(data):
  rng = np.random.default_rng(1)
  noise_train = rng.normal(size=data["f_train"].shape).astype(np.float32)
  noise_test = rng.normal(size=data["f_test"].shape).astype(np.float32)
  probe = fp.fit_pixel_probe(noise_train, data["m_train"], K, **FIT)
  scores = fp.probe_miou(probe, noise_test, data["m_test"], K)
  # Random guessing among 3 balanced classes gives IoU ~ p / (1 + 2p) = 0.2 per class.
  assert scores["miou"] < 0.4, scores
  assert scores["accuracy"] < 0.5, scores


def test_predictions_have_mask_shape_and_int_dtype(data):
  probe = fp.fit_pixel_probe(data["f_train"], data["m_train"], K, **{**FIT, "steps": 5})
  feats = data["f_train"][:5]
  preds = fp.predict_pixel_probe(probe, feats, (SIZE, SIZE), batch_images=2)  # padded tail
  assert preds.shape == (5, SIZE, SIZE)
  assert np.issubdtype(preds.dtype, np.integer)
  assert preds.min() >= 0 and preds.max() < K
  np.testing.assert_array_equal(
      preds, fp.predict_pixel_probe(probe, feats, (SIZE, SIZE), batch_images=8))
  assert fp.predict_pixel_probe(probe, feats, (12, 20)).shape == (5, 12, 20)


@pytest.mark.parametrize("h,w,H,W", [(5, 8, 16, 16), (16, 12, 8, 6), (8, 8, 8, 8)],
                         ids=["upsample", "antialiased_downsample", "identity"])
def test_sampled_pixels_match_full_resize(h, w, H, W):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, h, w, 3)), jnp.float32)
  ref = np.asarray(jax.image.resize(x, (2, H, W, 3), "bilinear"))
  taps = tuple(map(jnp.asarray, (*fp._resize_taps(h, H), *fp._resize_taps(w, W))))
  n, r, c = (jnp.asarray(a.ravel()) for a in np.meshgrid(
      np.arange(2), np.arange(H), np.arange(W), indexing="ij"))
  got = np.asarray(fp._gather_pixels(x, n, r, c, taps)).reshape(ref.shape)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_standardization_uses_training_statistics_only(data):
  rng = np.random.default_rng(3)
  scale = np.array([10.0, 0.1, 3.0, 1.0, 2.0, 5.0, 0.0], np.float32)  # last: constant
  offset = np.array([5.0, -2.0, 0.0, 1.0, 7.0, -3.0, 4.0], np.float32)
  f_train = data["f_train"] * scale + offset
  f_test = (data["f_test"] * scale + offset) * 2.0 + 3.0  # other statistics
  f_test[..., -1] = 9.0
  probe = fp.fit_pixel_probe(f_train, data["m_train"], K, **{**FIT, "steps": 20})

  flat = f_train.reshape(-1, f_train.shape[-1]).astype(np.float64)
  mean, std = flat.mean(axis=0), flat.std(axis=0)
  std = np.where(std > 1e-6, std, 1.0)
  np.testing.assert_allclose(probe.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probe.std, std, rtol=1e-4)
  test_std = f_test.reshape(-1, f_test.shape[-1]).std(axis=0)
  assert not np.allclose(probe.std[:-1], test_std[:-1], rtol=0.1)

  # NumPy forward pass with the training statistics reproduces the test predictions.
  up = np.asarray(jax.image.resize(f_test, f_test.shape[:1] + (SIZE, SIZE) + f_test.shape[-1:],
                                   "bilinear"), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), probe.params)
  hidden = np.maximum((up - mean) / std @ p["hidden"]["w"] + p["hidden"]["b"], 0)
  ref = (hidden @ p["out"]["w"] + p["out"]["b"]).argmax(axis=-1)
  got = fp.predict_pixel_probe(probe, f_test, (SIZE, SIZE))
  assert (got == ref).mean() > 0.999


def test_probe_grid_shape_calls_and_ranking(data):
  images = {"train": data["m_train"], "test": data["m_test"]}
  calls = []

  def extract(imgs, t):
    calls.append((imgs.shape, t))
    masks = np.asarray(imgs[..., 0]).round().astype(np.int32)
    rng = np.random.default_rng(t)
    good = _onehot_features(rng, masks, noise=0.1 + t / 2000)
    return {"good": good, "noise": rng.normal(size=good.shape).astype(np.float32),
            "unused": good[:, :2]}

  split = {k: {"image": m[..., None].astype(np.float32), "mask": m}
           for k, m in images.items()}
  grid, results = fp.probe_grid(extract, ["good", "noise"], [100, 500], split["train"],
                                split["test"], K, progress=False, **FIT)
  assert grid.shape == (2, 2)
  assert calls == [((16, SIZE, SIZE, 1), 100), ((16, SIZE, SIZE, 1), 500)]
  assert set(results) == {(b, t) for b in ("good", "noise") for t in (100, 500)}
  assert results[("good", 500)]["miou"] == grid[0, 1]
  assert np.all(grid[0] > grid[1] + 0.3), grid
  with pytest.raises(ValueError, match=r"blocks \['missing'\]"):
    fp.probe_grid(extract, ["missing"], [1], split["train"], split["test"], K,
                  progress=False, **FIT)


def test_probe_heatmap_figure_writes_png(tmp_path):
  grid = np.array([[0.5, 0.7, np.nan], [0.2, 0.9, 0.4]])
  path = figures.probe_heatmap_figure(grid, ["dec6", "dec8"], [100, 500, 900],
                                      tmp_path / "sub" / "probe.png", title="probe")
  data = open(path, "rb").read()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match=r"\(2, 2\)"):
    figures.probe_heatmap_figure(grid, ["a", "b"], [1, 2], tmp_path / "bad.png")


def test_bad_inputs_raise_naming_shapes_and_values():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  with pytest.raises(ValueError, match=re.escape("(4, 8, 8, 3)") + ".*"
                     + re.escape("(5, 16, 16)")):
    fp.fit_pixel_probe(feats, np.zeros((5, 16, 16), np.int32), K)
  bad = np.zeros((4, 16, 16), np.int32)
  bad[0, 0, 0] = K
  with pytest.raises(ValueError, match=re.escape("[0, 3]")):
    fp.fit_pixel_probe(feats, bad, K)
  with pytest.raises(ValueError, match="integer"):
    fp.fit_pixel_probe(feats, bad.astype(np.float32), K)
  probe = fp.fit_pixel_probe(feats, np.zeros((4, 16, 16), np.int32), K, steps=0)
  with pytest.raises(ValueError, match=re.escape("(4, 8, 8, 5)")):
    fp.predict_pixel_probe(probe, np.zeros((4, 8, 8, 5), np.float32), (16, 16))
