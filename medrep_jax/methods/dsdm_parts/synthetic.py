"""The synthetic image+mask datasets of DSDM: written by `sample`/`filter`, mixed into
the segmentation training set by `seg` (paper 004, Sec. V-C2, Fig. 6).

Layout (an `image_mask_folder` dataset): ROOT/images/NNNNNN.png (uint8 image) and
ROOT/masks/NNNNNN.png (uint8 class ids 0..K-1), so any run can read it with
`--config.data.name=image_mask_folder --config.data.root=ROOT --config.data.mask_threshold=-1`.
"""
from __future__ import annotations

import pathlib

import numpy as np

from medrep_jax.config_lib import ConfigError
from medrep_jax.data import imageio, mixing, readers


def write(images: np.ndarray, masks: np.ndarray, root: str | pathlib.Path,
          start: int = 0) -> list[pathlib.Path]:
  """Writes images in [0, 1] (N, H, W, C) and int masks (N, H, W) as paired PNGs."""
  root = pathlib.Path(root)
  if len(images) != len(masks) or images.shape[1:3] != masks.shape[1:3]:
    raise ValueError(f"images {images.shape} and masks {masks.shape} do not pair")
  (root / "images").mkdir(parents=True, exist_ok=True)
  (root / "masks").mkdir(parents=True, exist_ok=True)
  paths = []
  for k, (img, mask) in enumerate(zip(images, masks)):
    name = f"{start + k:06d}.png"
    u8 = np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
    (root / "images" / name).write_bytes(imageio.encode_png(u8))
    (root / "masks" / name).write_bytes(imageio.encode_png(np.asarray(mask, np.uint8)))
    paths.append(root / "images" / name)
  return paths


def read(root: str | pathlib.Path, num_classes: int, channels: int):
  """The dataset `write` made (every pair: split "all")."""
  root = pathlib.Path(root)
  if not (root / "images").is_dir() or not (root / "masks").is_dir():
    raise ConfigError(f"synthetic_dir {root} is not a DSDM synthetic dataset (expected "
                      f"{root}/images/ and {root}/masks/, as the sample and filter stages "
                      f"write)")
  return readers.ImageMaskFolder(root, "all", mask_threshold=None, num_mask_classes=num_classes,
                                 channels=channels)


def pool_dir(config) -> str:
  """`config.synthetic_dir`, which a synthetic_fraction > 0 needs."""
  if not config.synthetic_dir:
    raise ConfigError("synthetic_fraction > 0 needs synthetic_dir: the images/ folder of a "
                      "dsdm sample or filter run (in the pipeline: 'stage:filter/images')")
  return str(config.synthetic_dir)


def mix(real, config, num_classes: int):
  """The real train source plus `config.synthetic_fraction` of the pool in
  `config.synthetic_dir` (the fraction of the pool, as the paper samples "a certain
  proportion" of its 2,000 selected images; 0 = real only; `data.mixing`)."""
  fraction = float(config.synthetic_fraction)
  if fraction <= 0:
    return real
  pool = read(pool_dir(config), num_classes, int(real.info.channels))
  return mixing.mix(real, pool, fraction=fraction, seed=int(config.seed),
                    keys=("image", "mask"))
