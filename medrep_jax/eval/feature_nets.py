"""Pluggable feature networks for Frechet distance, KID and the synthetic-image filter.

A feature net is a callable `images (N, H, W, C) float in [0, 1] -> (N, D) float64` with a
`label` naming it; FD values are comparable only under the same label. Kinds:

- `vae`: the LDM's own KL-VAE encoder (trained by this library): the posterior mean,
  average-pooled to a 4x4 grid, plus per-channel mean and std of the latent.
- `encoder`: the `encoder` subtree of any medrep_jax run (fine-tuning, pretraining):
  its globally pooled last-stage features.
- `inception`: InceptionV3 pool3 features with FID weights from a user-supplied file
  (nothing can be downloaded here; see `medrep_jax/eval/inception_weights.py`).
"""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("vae", "encoder", "inception")


def batched(fn: Callable[[jax.Array], jax.Array], images: np.ndarray,
             batch_size: int) -> np.ndarray:
  """Applies a jitted fn in fixed-size batches (the last one padded: one compilation)."""
  n = len(images)
  out = []
  for i in range(0, n, batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    out.append(np.asarray(fn(jnp.asarray(chunk)))[:batch_size - pad])
  return np.concatenate(out).astype(np.float64)


def _match_channels(images: np.ndarray, channels: int) -> np.ndarray:
  if images.shape[-1] == channels:
    return images
  if channels == 3 and images.shape[-1] == 1:
    return np.repeat(images, 3, -1)
  if channels == 1 and images.shape[-1] == 3:
    return images.mean(-1, keepdims=True)
  raise ValueError(f"cannot convert {images.shape[-1]}-channel images to {channels}")


def _resize(x: jax.Array, size: int) -> jax.Array:
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")


class ModelFeatures:
  """A trained model's features: a jitted `images -> (N, D)` in fixed-size batches."""

  def __init__(self, fn: Callable[[jax.Array], jax.Array], *, channels: int, size: int,
               label: str, batch_size: int = 64):
    self.channels, self.size, self.label, self.batch_size = channels, size, label, batch_size
    self._fn = jax.jit(lambda x: fn(_resize(x, size)))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return batched(self._fn, _match_channels(np.asarray(images, np.float32),
                                              self.channels), self.batch_size)


def vae_features(trained, batch_size: int = 64) -> ModelFeatures:
  """Pooled posterior means of an LDM VAE run (`ldm` stage `vae`), from `load_trained`."""
  model, variables, cfg = trained.model, trained.variables, trained.config

  def feats(x):
    mean = model.apply(variables, x * 2.0 - 1.0, method=model.encode).mean
    b, _, _, c = mean.shape
    grid = jax.image.resize(mean, (b, 4, 4, c), "linear").reshape(b, -1)
    return jnp.concatenate([grid, mean.mean((1, 2)), mean.std((1, 2))], -1)

  return ModelFeatures(feats, channels=trained.stage.channels, size=int(cfg.data.image_size),
                       label=f"LDM VAE encoder ({trained.run.path.name}, trained by "
                             f"medrep_jax)", batch_size=batch_size)


def encoder_features(trained, batch_size: int = 64) -> ModelFeatures:
  """Globally pooled features of the `encoder` submodule of any run, from `load_trained`."""
  encoder, variables, cfg = trained.model.encoder, trained.run.variables("encoder"), trained.config
  return ModelFeatures(lambda x: encoder.apply(variables, x, train=False)["pooled"],
                       channels=trained.stage.channels, size=int(cfg.data.image_size),
                       label=f"{cfg.model.encoder} encoder of run {trained.run.path.name} "
                             f"(medrep_jax)", batch_size=batch_size)


def make_feature_net(kind: str, *, trained=None, weights_path: str | pathlib.Path = "",
                     batch_size: int = 64):
  """A feature net of `kind`: from a loaded run (vae, encoder) or a weights file (inception).

  `medrep_jax.methods.feature_net(kind, path)` loads the run and calls this.
  """
  if kind in ("vae", "encoder"):
    if trained is None:
      raise ValueError(f"feature net {kind!r} needs a trained run (methods.load_trained)")
    return (vae_features if kind == "vae" else encoder_features)(trained, batch_size)
  if kind == "inception":
    from medrep_jax.eval import inception_weights  # pylint: disable=g-import-not-at-top
    return inception_weights.InceptionFeatures(weights_path, batch_size=min(batch_size, 32))
  raise ValueError(f"feature net kind {kind!r}; expected one of {KINDS}")
