"""Pieces both DRFL stages use: resampling, paired flips/rotations, the SR-target cache,
PSNR and FLOPs."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.data.sources import DataError

CACHE_NAME = "sr_targets_train.npz"


def resize(images: jax.Array, factor: float, method: str = "bicubic") -> jax.Array:
  """(B, H, W, C) resized by `factor` (antialiased when shrinking), clipped to [0, 1]."""
  b, h, w, c = images.shape
  out = jax.image.resize(images.astype(jnp.float32),
                         (b, int(round(h * factor)), int(round(w * factor)), c), method)
  return jnp.clip(out, 0.0, 1.0)


def half(images: jax.Array) -> jax.Array:
  """The teacher's low-resolution input: the image downsampled to 1/2 (Sec. 3.1.2)."""
  return resize(images, 0.5)


def bicubic_2x(images: jax.Array) -> jax.Array:
  """The `sr_target=bicubic` control: the bicubic 2x upsample of the image."""
  return resize(images, 2.0)


def _flip_rot(key: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """One example: the same random h-flip, v-flip and 90° rotation of every (H, W, ...)
  array (exact index maps, so masks stay binary and the 2x SR target stays aligned)."""
  kh, kv, kr = jax.random.split(key, 3)
  hflip, vflip = jax.random.bernoulli(kh), jax.random.bernoulli(kv)
  square = all(a.shape[0] == a.shape[1] for a in arrays)
  k = jax.random.randint(kr, (), 0, 4) if square else 0
  out = []
  for a in arrays:
    a = jnp.where(hflip, a[:, ::-1], a)
    a = jnp.where(vflip, a[::-1], a)
    if square:
      a = jax.lax.switch(k, [lambda x, i=i: jnp.rot90(x, i, axes=(0, 1)) for i in range(4)], a)
    out.append(a)
  return tuple(out)


def flip_rotate(rng: jax.Array, batch: dict[str, jax.Array],
                keys: tuple[str, ...] = ("image", "mask", "sr")) -> dict[str, jax.Array]:
  """Random flips and 90° rotations (Sec. 4, "flips/rotations"), per example, applied
  alike to `keys` present in `batch` (image (B,H,W,C), mask (B,H,W), sr (B,2H,2W,C))."""
  present = [k for k in keys if k in batch]
  rngs = jax.random.split(rng, batch[present[0]].shape[0])
  moved = jax.vmap(_flip_rot)(rngs, *[batch[k] for k in present])
  return {**batch, **dict(zip(present, moved))}


def gflops_per_image(apply_fn, variables, image_shape: tuple[int, ...]) -> float:
  """GFLOPs of one forward pass on one image, from XLA's cost analysis of the jitted
  function (`jax.jit(f).lower(x).compile().cost_analysis()`; a multiply-add counts 2)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  cost = jax.jit(apply_fn).lower(variables, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan"))) / 1e9


# ------------------------------------------------------------------ the SR-target cache
def fingerprint(images: np.ndarray) -> np.ndarray:
  """A per-image checksum (mean, std) tying cached targets to the images they came from."""
  flat = np.asarray(images, np.float64).reshape(len(images), -1)
  return np.stack([flat.mean(1), flat.std(1)], 1).astype(np.float32)


def map_source(fn, source, transforms, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(fn(images) for every transformed record of `source`, in order, as one array; and the
  images' fingerprints), streamed in batches of `batch_size` (the last one padded)."""
  from medrep_jax.data import loader  # pylint: disable=g-import-not-at-top
  outs, fps = [], []
  for b in loader.eval_batches(source, transforms, global_batch=batch_size,
                               process_index=0, process_count=1):
    keep = b["_valid"] > 0
    outs.append(np.asarray(fn(jnp.asarray(b["image"])))[keep])
    fps.append(fingerprint(b["image"][keep]))
  return np.concatenate(outs), np.concatenate(fps)


def save_targets(path: pathlib.Path, sr: np.ndarray, fingerprints: np.ndarray) -> None:
  """Writes the 2x targets (N, 2H, 2W, C) and their images' fingerprints, float16."""
  if jax.process_index() != 0:
    return
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, sr=np.asarray(sr, np.float16), fingerprint=fingerprints)
  tmp.replace(path)


def load_targets(path: pathlib.Path, fingerprints: np.ndarray,
                 hw: tuple[int, int]) -> np.ndarray | None:
  """The cached 2x targets of the images with `fingerprints` and size `hw`, or None when
  there is no cache.

  Raises:
    DataError: the cache holds targets of other images (another split, fold or size).
  """
  if not path.exists():
    return None
  with np.load(path) as f:
    sr, fp = f["sr"], f["fingerprint"]
  if (len(sr) != len(fingerprints) or tuple(sr.shape[1:3]) != (2 * hw[0], 2 * hw[1])
      or not np.allclose(fp, fingerprints, atol=1e-3)):
    raise DataError(f"{path}: the cached SR targets {sr.shape} are not those of this "
                    f"run's {len(fingerprints)} training images of size {tuple(hw)}; the "
                    f"teacher stage ran on other data (split, fold, image size). Point "
                    f"teacher_from at a teacher of the same data, or delete the cache")
  return sr


class WithTargets:
  """A source whose records gain "sr" (the cached 2x SR target of the same index)."""

  def __init__(self, source, sr: np.ndarray):
    if len(source) != len(sr):
      raise DataError(f"{len(sr)} SR targets for {len(source)} training images")
    self.source, self.sr, self.info = source, sr, source.info

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return {**self.source[i], "sr": np.asarray(self.sr[int(i)], np.float32)}
