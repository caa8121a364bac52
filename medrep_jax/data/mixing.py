"""Real + synthetic training sets: how many synthetic images, which ones, and the source.

Both papers that train on generated images state the amount as a share of the curated
synthetic pool: DCL-CsTP Table 4 adds 0%, 10%, 50% or 100% of its filtered images to the
real set and has a "synthetic only" row; DiffusionDCI Fig. 6 samples "a certain
proportion" of its 2,000 selected images. So the config fields are

  synthetic_fraction   the fraction of the pool that is added (0 = real only, 1 = all);
  synthetic_only       train on that part of the pool alone (no real images);
  synthetic_per_real   the older rule: round(x * |real|) synthetic images, whatever the
                       pool's size (DCL-CsTP configs before 2026-12; exclusive with the
                       fraction).

Which synthetic images are taken is fixed by the seed (a permutation of the pool), so a
run and its resume, and two methods with the same seed, see the same ones.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medrep_jax.config_lib import ConfigError
from medrep_jax.data.sources import SourceInfo


def synthetic_count(pool_size: int, num_real: int, *, fraction: float = 0.0,
                    per_real: float = 0.0) -> int:
  """How many synthetic images to take: fraction x pool, or per_real x num_real (capped
  at the pool, with a message when the pool is short)."""
  fraction, per_real = float(fraction), float(per_real)
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"synthetic_fraction must be in [0, 1] (the fraction of the synthetic "
                      f"pool that is added), got {fraction}")
  if per_real < 0:
    raise ConfigError(f"synthetic_per_real must be >= 0, got {per_real}")
  if fraction > 0 and per_real > 0:
    raise ConfigError(f"set one of synthetic_fraction ({fraction}, a fraction of the pool) "
                      f"and synthetic_per_real ({per_real}, synthetic images per real one), "
                      f"not both")
  if per_real > 0:
    want = int(round(per_real * num_real))
    if want > pool_size:
      print(f"synthetic_per_real={per_real}: {want} images asked for, but the synthetic "
            f"pool has {pool_size}; using all of them")
    return min(want, pool_size)
  return int(round(fraction * pool_size))


class MixedSource:
  """Real records (none when `real` is None) followed by the `picked` synthetic ones.

  Records keep `keys` and get a fresh `index` (the position in this source: augmentation
  keys and the memory bank are per example)."""

  def __init__(self, real, synthetic, picked: np.ndarray, keys: Sequence[str] = ("image",)):
    self.real, self.synthetic, self.keys = real, synthetic, tuple(keys)
    self.num_real = 0 if real is None else len(real)
    self.picked = np.asarray(picked, np.int64)
    base = (synthetic if real is None else real).info
    with_mask = "mask" in self.keys
    self.info = SourceInfo(
        name=f"{base.name}+synthetic" if real is not None else f"{base.name} (synthetic only)",
        num_classes=base.num_classes if with_mask else 0,
        class_names=base.class_names if with_mask else (), channels=base.channels,
        has_mask=with_mask, num_mask_classes=base.num_mask_classes if with_mask else 0)

  @property
  def num_synthetic(self) -> int:
    return len(self.picked)

  def __len__(self) -> int:
    return self.num_real + self.num_synthetic

  def __getitem__(self, i: int):
    i = int(i)
    rec = (self.real[i] if i < self.num_real
           else self.synthetic[int(self.picked[i - self.num_real])])
    return {**{k: rec[k] for k in self.keys}, "index": np.int64(i)}


def mix(real, pool, *, fraction: float = 0.0, per_real: float = 0.0, only: bool = False,
        seed: int = 0, keys: Sequence[str] = ("image",)):
  """The training source: `real` plus the chosen part of `pool` (or that part alone with
  `only`). With nothing synthetic asked for, `real` itself."""
  n = synthetic_count(len(pool), len(real), fraction=fraction, per_real=per_real)
  if only and n == 0:
    raise ConfigError("synthetic_only needs synthetic images: set synthetic_fraction "
                      "(1.0 = the whole pool)")
  if n == 0:
    return real
  picked = np.random.default_rng(seed).permutation(len(pool))[:n]
  return MixedSource(None if only else real, pool, picked, keys)
