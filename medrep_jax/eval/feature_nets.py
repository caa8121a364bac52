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

from medrep_jax.train import runs

KINDS = ("vae", "encoder", "inception")


def _batched(fn: Callable[[jax.Array], jax.Array], images: np.ndarray,
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


class VAEFeatures:
  """Pooled posterior means of an LDM VAE run (`ldm` stage `vae`)."""

  def __init__(self, run_dir: str | pathlib.Path, batch_size: int = 64):
    from medrep_jax.methods.ldm_parts import common  # pylint: disable=g-import-not-at-top
    loaded = common.load_vae(run_dir)
    model, params = loaded.model, loaded.params
    self.channels, self.size = loaded.channels, loaded.image_size
    self.batch_size = batch_size
    self.label = f"LDM VAE encoder ({pathlib.Path(run_dir).name}, trained by medrep_jax)"

    def feats(x):
      x = _resize(x, self.size) * 2.0 - 1.0
      mean = model.apply({"params": params}, x, method=model.encode).mean
      b, h, w, c = mean.shape
      grid = jax.image.resize(mean, (b, 4, 4, c), "linear").reshape(b, -1)
      return jnp.concatenate([grid, mean.mean((1, 2)), mean.std((1, 2))], -1)

    self._fn = jax.jit(feats)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return _batched(self._fn, _match_channels(np.asarray(images, np.float32),
                                              self.channels), self.batch_size)


class EncoderFeatures:
  """Pooled features of the `encoder` subtree of a medrep_jax run."""

  def __init__(self, run_dir: str | pathlib.Path, batch_size: int = 64):
    from medrep_jax.models import unet  # pylint: disable=g-import-not-at-top
    cfg, tree = runs.load_run(run_dir)
    m = cfg.model
    encoder = unet.encoder_from_config(m)
    variables = {"params": tree["params"]["encoder"]}
    stats = tree.get("model_state", {}).get("batch_stats", {})
    if "encoder" in stats:
      variables["batch_stats"] = stats["encoder"]
    self.channels, self.size = int(cfg.data.channels), int(cfg.data.image_size)
    self.batch_size = batch_size
    self.label = f"{m.encoder} encoder of run {pathlib.Path(run_dir).name} (medrep_jax)"
    self._fn = jax.jit(lambda x: encoder.apply(variables, _resize(x, self.size),
                                               train=False)["pooled"])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return _batched(self._fn, _match_channels(np.asarray(images, np.float32),
                                              self.channels), self.batch_size)


def make_feature_net(kind: str, path: str | pathlib.Path, batch_size: int = 64):
  """Builds a feature net of `kind` from a run directory or (inception) a weights file."""
  if kind == "vae":
    return VAEFeatures(path, batch_size)
  if kind == "encoder":
    return EncoderFeatures(path, batch_size)
  if kind == "inception":
    from medrep_jax.eval import inception_weights  # pylint: disable=g-import-not-at-top
    return inception_weights.InceptionFeatures(path, batch_size=min(batch_size, 32))
  raise ValueError(f"feature net kind {kind!r}; expected one of {KINDS}")
