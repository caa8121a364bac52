"""Pixel probes on frozen dense features: which (block, timestep) segments best?

The feature-probing analysis of DSDM (Sec. IV-C1, Fig. 3), in the style of
label-efficient DDPM segmentation (Baranchuk et al., 2022): for each decoder block
of a trained diffusion UNet and each diffusion timestep t, a small per-pixel
classifier is trained on the frozen features of a few labelled images and scored
by test mIoU; the scores form a (blocks x timesteps) heatmap.

* ``fit_pixel_probe``: a per-pixel MLP (or linear) probe trained with Adam on
  softmax cross-entropy over random minibatches of pixels, the whole loop one
  jitted ``jax.lax.fori_loop``. Features of any resolution (h, w) are bilinearly
  upsampled to the mask resolution (H, W) (``jax.image.resize``), the
  label-efficient-DDPM way; the resize is evaluated only at the sampled pixels,
  so the full (N, H, W, C) upsampled feature stack is never held in memory.
* ``predict_pixel_probe``, ``probe_miou``: batched prediction and mIoU / mean
  Dice through ``metrics.confusion_matrix`` and ``metrics.confusion_scores``.
* ``probe_grid``: the whole (blocks x timesteps) sweep with one feature
  extraction call per timestep; ``figures.probe_heatmap_figure`` plots it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from medrep_jax.eval import metrics

# Channels whose training std is at most this are only centred, not scaled.
_STD_EPS = 1e-6


class PixelProbe(NamedTuple):
  """A fitted pixel probe (a pytree).

  Attributes:
    params: ``{"hidden": {"w": (C, hidden), "b": (hidden,)}, "out": {"w", "b"}}``;
      a linear probe has no ``"hidden"`` entry. ``out["w"]`` is (C or hidden, K).
    mean: (C,) per-channel mean of the training features.
    std: (C,) per-channel std of the training features (1 for constant channels).
  """
  params: dict[str, dict[str, jax.Array]]
  mean: jax.Array
  std: jax.Array


def _check_features_masks(features: Any, masks: Any, num_classes: int
                          ) -> tuple[tuple[int, ...], np.ndarray]:
  """Validates (N, h, w, C) features against (N, H, W) masks; returns the masks as int32."""
  f_shape = tuple(np.shape(features))
  masks = np.asarray(masks)
  if len(f_shape) != 4 or masks.ndim != 3:
    raise ValueError(f"features must be (N, h, w, C) and masks (N, H, W); got features "
                     f"{f_shape} and masks {masks.shape}")
  if f_shape[0] != masks.shape[0]:
    raise ValueError(f"features and masks must hold the same number of images N; got "
                     f"features {f_shape} and masks {masks.shape}")
  if f_shape[0] == 0 or min(f_shape[1:]) == 0 or min(masks.shape[1:]) == 0:
    raise ValueError(f"empty features or masks: features {f_shape}, masks {masks.shape}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2; got {num_classes}")
  if not np.issubdtype(masks.dtype, np.integer):
    raise ValueError(f"masks must hold integer class labels; got dtype {masks.dtype}")
  lo, hi = int(masks.min()), int(masks.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(f"mask values must lie in [0, {num_classes}) for num_classes="
                     f"{num_classes}; got values in [{lo}, {hi}]")
  return f_shape, masks.astype(np.int32)


@functools.lru_cache(maxsize=64)
def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Sparse form of 1-D bilinear ``jax.image.resize`` from ``in_size`` to ``out_size``.

  The resize is linear, so its (out, in) matrix is the resize of the identity. Row o
  keeps its nonzero entries as ``idx[o]`` / ``wts[o]`` (padded with weight 0 to the
  widest row: 2 taps when upsampling, more when antialiased downsampling).

  Returns:
    ``idx`` (out_size, K) int32 input positions and ``wts`` (out_size, K) float32 weights.
  """
  m = np.asarray(jax.image.resize(jnp.eye(in_size, dtype=jnp.float32),
                                  (out_size, in_size), "bilinear"))
  nonzero = m != 0
  k = max(int(nonzero.sum(axis=1).max()), 1)
  order = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]  # nonzero columns first
  wts = np.take_along_axis(m, order, axis=1) * np.take_along_axis(nonzero, order, axis=1)
  return order.astype(np.int32), wts.astype(np.float32)


def _gather_pixels(features: jax.Array, n: jax.Array, r: jax.Array, c: jax.Array,
                   taps: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
  """(B, C) float32 features of the resized stack at pixels (n, r, c), without resizing all.

  Equals ``jax.image.resize(features, (N, H, W, C), "bilinear")[n, r, c]`` (the resize
  is separable), touching only each pixel's K_H x K_W input taps.
  """
  row_idx, row_w, col_idx, col_w = taps
  ri, rw = row_idx[r], row_w[r]  # (B, K_H)
  ci, cw = col_idx[c], col_w[c]  # (B, K_W)
  patch = features[n[:, None, None], ri[:, :, None], ci[:, None, :]]  # (B, K_H, K_W, C)
  return jnp.einsum("bi,bj,bijc->bc", rw, cw, patch.astype(jnp.float32))


def _logits(params: Mapping[str, Mapping[str, jax.Array]], x: jax.Array) -> jax.Array:
  """The probe MLP on standardized (..., C) features: (..., K) logits."""
  if "hidden" in params:
    x = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
  return x @ params["out"]["w"] + params["out"]["b"]


def _init_params(key: jax.Array, channels: int, hidden: int,
                 num_classes: int) -> dict[str, dict[str, jax.Array]]:
  k_hidden, k_out = jax.random.split(key)
  params = {}
  width = channels
  if hidden:
    params["hidden"] = {
        "w": jax.nn.initializers.he_normal()(k_hidden, (channels, hidden), jnp.float32),
        "b": jnp.zeros((hidden,), jnp.float32)}
    width = hidden
  params["out"] = {
      "w": jax.nn.initializers.lecun_normal()(k_out, (width, num_classes), jnp.float32),
      "b": jnp.zeros((num_classes,), jnp.float32)}
  return params


def _channel_stats(features: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and std over (N, h, w) in float32; constant channels get std 1."""
  mean = jnp.mean(features, axis=(0, 1, 2), dtype=jnp.float32)
  var = jnp.mean(jnp.square(features.astype(jnp.float32) - mean), axis=(0, 1, 2))
  std = jnp.sqrt(var)
  return mean, jnp.where(std > _STD_EPS, std, 1.0)


@functools.partial(jax.jit, static_argnames=("num_classes", "hidden", "batch_pixels"))
def _fit(features: jax.Array, masks: jax.Array,
         taps: tuple[jax.Array, jax.Array, jax.Array, jax.Array], key: jax.Array,
         steps: jax.Array, lr: jax.Array, *, num_classes: int, hidden: int,
         batch_pixels: int) -> PixelProbe:
  """Standardization statistics, then ``steps`` Adam steps on random pixel minibatches."""
  n_img, height, width = masks.shape
  mean, std = _channel_stats(features)
  k_init, k_data = jax.random.split(key)
  params = _init_params(k_init, features.shape[-1], hidden, num_classes)
  opt = optax.adam(lr)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()

  def step(i, carry):
    p, state = carry
    kn, kr, kc = jax.random.split(jax.random.fold_in(k_data, i), 3)
    n = jax.random.randint(kn, (batch_pixels,), 0, n_img)
    r = jax.random.randint(kr, (batch_pixels,), 0, height)
    c = jax.random.randint(kc, (batch_pixels,), 0, width)
    x = (_gather_pixels(features, n, r, c, taps) - mean) / std
    grads = jax.grad(loss_fn)(p, x, masks[n, r, c])
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
  return PixelProbe(params=params, mean=mean, std=std)


def _nearest_downsample(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(N, H, W) -> (N, h, w) nearest neighbour with half-pixel centres (as
  ``jax.image.resize(..., "nearest")``): output (i, j) takes input
  (floor((i + 0.5) H / h), floor((j + 0.5) W / w))."""
  height, width = masks.shape[1:]
  rows = np.floor((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64)
  cols = np.floor((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64)
  return masks[:, rows[:, None], cols[None, :]]


def fit_pixel_probe(features: Any, masks: Any, num_classes: int, *, hidden: int = 64,
                    steps: int = 1000, lr: float = 1e-3, batch_pixels: int = 4096,
                    downsample_masks: bool = False, seed: int = 0) -> PixelProbe:
  """Trains a per-pixel classifier on frozen dense features.

  Resolution: by default the (h, w) features are bilinearly upsampled
  (``jax.image.resize``, half-pixel centres) to the (H, W) mask resolution and every
  mask pixel is a training example, as in label-efficient DDPM segmentation. The
  resize runs inside the jitted step, only at the sampled pixels. With
  ``downsample_masks`` the masks are instead nearest-downsampled to (h, w) (half-pixel
  centres) and the probe trains on the features as they are (fewer, coarser examples);
  either way ``predict_pixel_probe`` upsamples the features to the requested size.

  Each channel is standardized by the mean and std of the training features over all
  N x h x w positions (the statistics are stored in the probe and reused unchanged at
  prediction; a channel constant on the training set is only centred). Standardizing
  commutes with the resize, whose weights sum to 1. The probe is an MLP
  C -> ``hidden`` (ReLU) -> ``num_classes`` (``hidden=0``: linear), trained with Adam on
  softmax cross-entropy over ``batch_pixels`` pixels drawn uniformly with replacement
  per step, for ``steps`` steps: all in one jitted ``fori_loop``, compiled once per
  (feature shape, mask shape, hidden, batch_pixels, num_classes), so repeated calls
  (other timesteps, seeds, step counts, learning rates) reuse it.

  Args:
    features: (N, h, w, C) float features (any float dtype; math in float32).
    masks: (N, H, W) integer labels in [0, num_classes).
    num_classes: K >= 2, background included.
    hidden: hidden width of the MLP; 0 gives a linear probe.
    steps: number of Adam steps.
    lr: Adam learning rate.
    batch_pixels: pixels per minibatch.
    downsample_masks: train at the feature resolution on nearest-downsampled masks
      instead of on features upsampled to the mask resolution.
    seed: seeds the initialization and the pixel sampling.

  Returns:
    The fitted ``PixelProbe`` (MLP params and normalization statistics).

  Raises:
    ValueError: on mismatched shapes (e.g. a different N), non-integer masks or
      mask values outside [0, num_classes), or non-positive sizes.
  """
  f_shape, masks = _check_features_masks(features, masks, num_classes)
  if steps < 0 or hidden < 0 or batch_pixels < 1:
    raise ValueError(f"need steps >= 0, hidden >= 0 and batch_pixels >= 1; got steps="
                     f"{steps}, hidden={hidden}, batch_pixels={batch_pixels}")
  _, h, w, _ = f_shape
  if downsample_masks:
    masks = _nearest_downsample(masks, (h, w))
  height, width = masks.shape[1:]
  taps = (*_resize_taps(h, height), *_resize_taps(w, width))
  return _fit(jnp.asarray(features), jnp.asarray(masks), tuple(map(jnp.asarray, taps)),
              jax.random.key(seed), jnp.int32(steps), jnp.float32(lr),
              num_classes=num_classes, hidden=hidden, batch_pixels=batch_pixels)


@functools.partial(jax.jit, static_argnames=("out_size",))
def _predict_batch(probe: PixelProbe, features: jax.Array,
                   out_size: tuple[int, int]) -> jax.Array:
  b, _, _, channels = features.shape
  x = jax.image.resize(features.astype(jnp.float32), (b, *out_size, channels), "bilinear")
  return jnp.argmax(_logits(probe.params, (x - probe.mean) / probe.std), axis=-1
                    ).astype(jnp.int32)


def predict_pixel_probe(probe: PixelProbe, features: Any, out_size: Sequence[int], *,
                        batch_images: int = 4) -> np.ndarray:
  """Per-pixel class predictions of a fitted probe.

  Features are bilinearly resized to ``out_size`` (``jax.image.resize``), standardized
  with the probe's training statistics and classified. Images go ``batch_images`` at a
  time (the last batch zero-padded, so one compiled program serves all), so memory
  holds at most batch_images x H x W x max(C, hidden) float32 values.

  Args:
    probe: from ``fit_pixel_probe``.
    features: (N, h, w, C) features with the probe's C.
    out_size: (H, W) of the predicted masks.
    batch_images: images per device call.

  Returns:
    (N, H, W) int32 class predictions.
  """
  f_shape = tuple(np.shape(features))
  channels = int(probe.mean.shape[0])
  if len(f_shape) != 4 or f_shape[-1] != channels:
    raise ValueError(f"features must be (N, h, w, {channels}) for this probe; got {f_shape}")
  out_size = tuple(int(s) for s in out_size)
  if len(out_size) != 2 or min(out_size) < 1:
    raise ValueError(f"out_size must be (H, W) with positive sizes; got {out_size}")
  if batch_images < 1:
    raise ValueError(f"batch_images must be >= 1; got {batch_images}")
  n = f_shape[0]
  out = np.empty((n, *out_size), np.int32)
  b = min(batch_images, max(n, 1))
  for start in range(0, n, b):
    chunk = jnp.asarray(features[start:start + b])
    m = chunk.shape[0]
    if m < b:
      chunk = jnp.pad(chunk, ((0, b - m), (0, 0), (0, 0), (0, 0)))
    out[start:start + m] = np.asarray(_predict_batch(probe, chunk, out_size))[:m]
  return out


def probe_miou(probe: PixelProbe, features: Any, masks: Any, num_classes: int, *,
               batch_images: int = 4) -> dict[str, float]:
  """Scores a probe: mIoU and mean Dice over all classes, background included.

  Predictions are made at the masks' resolution. Scores come from one confusion matrix
  over every pixel of the set (``metrics.confusion_matrix``, then
  ``metrics.confusion_scores(cm, include_background=True)``): a class absent from both
  the masks and the predictions is left out of the means.

  Args:
    probe: from ``fit_pixel_probe``.
    features: (N, h, w, C) features.
    masks: (N, H, W) integer labels in [0, num_classes).
    num_classes: K, background included.
    batch_images: images per prediction call.

  Returns:
    ``miou``, ``mean_dice``, ``accuracy`` (pixel accuracy) and per class ``iou/c`` and
    ``dice/c``.
  """
  _, masks = _check_features_masks(features, masks, num_classes)
  preds = predict_pixel_probe(probe, features, masks.shape[1:], batch_images=batch_images)
  scores = metrics.confusion_scores(metrics.confusion_matrix(masks, preds, num_classes),
                                    include_background=True)
  out = {"miou": scores["mean_iou"], "mean_dice": scores["mean_dice"],
         "accuracy": scores["accuracy"]}
  for c in range(num_classes):
    out[f"iou/{c}"] = scores[f"iou/{c}"]
    out[f"dice/{c}"] = scores[f"dice/{c}"]
  return out


def _check_split(name: str, split: Mapping[str, Any]) -> tuple[Any, np.ndarray]:
  if "image" not in split or "mask" not in split:
    raise ValueError(f"{name} must hold 'image' and 'mask'; got keys {sorted(split)}")
  images, masks = split["image"], np.asarray(split["mask"])
  if np.ndim(images) != 4 or masks.ndim != 3 or np.shape(images)[:3] != masks.shape:
    raise ValueError(f"{name}: images must be (N, H, W, ch) and masks (N, H, W) with the "
                     f"same N, H, W; got images {np.shape(images)} and masks {masks.shape}")
  return images, masks


def probe_grid(extract: Callable[[Any, Any], Mapping[str, Any]], blocks: Sequence[str],
               timesteps: Sequence[Any], train: Mapping[str, Any], test: Mapping[str, Any],
               num_classes: int, *, progress: bool = True, **fit_kw: Any
               ) -> tuple[np.ndarray, dict[tuple[str, Hashable], dict[str, float]]]:
  """Test mIoU of a pixel probe for every (block, timestep) pair (DSDM Fig. 3).

  For each timestep t, ``extract`` is called exactly once, on the train images followed
  by the test images (concatenated along N, so extraction must treat images
  independently), and returns the features of every block; then one probe per block is
  fitted on the train part (``fit_pixel_probe(**fit_kw)``, the same seed for every
  cell) and scored on the test part (``probe_miou``).

  Args:
    extract: ``extract(images, t) -> {block name: (N, h, w, C) features}`` for the
      (N_train + N_test, H, W, ch) images; it may return more blocks than asked for.
    blocks: the block names to probe (the grid's rows).
    timesteps: the timesteps passed to ``extract`` (the grid's columns).
    train: ``{"image": (N, H, W, ch), "mask": (N, H, W)}`` to fit on.
    test: the same for scoring.
    num_classes: K, background included.
    progress: show a tqdm bar over the timesteps.
    **fit_kw: keyword arguments of ``fit_pixel_probe`` (hidden, steps, lr, ...).

  Returns:
    ``(grid, results)``: grid (len(blocks), len(timesteps)) float64 test mIoU, and
    ``results[(block, t)]``, the full ``probe_miou`` dict of each cell.
  """
  blocks, timesteps = list(blocks), list(timesteps)
  if not blocks or not timesteps:
    raise ValueError(f"need at least one block and one timestep; got blocks={blocks}, "
                     f"timesteps={timesteps}")
  tr_images, tr_masks = _check_split("train", train)
  te_images, te_masks = _check_split("test", test)
  if np.shape(tr_images)[1:] != np.shape(te_images)[1:]:
    raise ValueError(f"train and test images must share (H, W, ch); got "
                     f"{np.shape(tr_images)} and {np.shape(te_images)}")
  n_train, n_total = len(tr_masks), len(tr_masks) + len(te_masks)
  xp = jnp if isinstance(tr_images, jax.Array) or isinstance(te_images, jax.Array) else np
  images = xp.concatenate([xp.asarray(tr_images), xp.asarray(te_images)], axis=0)
  grid = np.full((len(blocks), len(timesteps)), np.nan)
  results: dict[tuple[str, Hashable], dict[str, float]] = {}
  bar = tqdm(timesteps, desc="feature probe", disable=not progress)
  for j, t in enumerate(bar):
    feats = extract(images, t)
    missing = [b for b in blocks if b not in feats]
    if missing:
      raise ValueError(f"extract(images, {t}) returned no features for blocks {missing}; "
                       f"it returned {sorted(feats)}")
    for i, block in enumerate(blocks):
      f = feats[block]
      if np.ndim(f) != 4 or np.shape(f)[0] != n_total:
        raise ValueError(f"block {block!r} at t={t}: expected ({n_total}, h, w, C) "
                         f"features; got {np.shape(f)}")
      probe = fit_pixel_probe(f[:n_train], tr_masks, num_classes, **fit_kw)
      results[(block, t)] = probe_miou(probe, f[n_train:], te_masks, num_classes)
      grid[i, j] = results[(block, t)]["miou"]
    bar.set_postfix(best=f"{np.nanmax(grid):.3f}")
    del feats
  return grid, results
