"""Procedural chest-radiograph-like phantoms with lesion labels and masks.

No download needed; every element is generated on access, deterministically
from `np.random.default_rng((seed, split_id, index))`. An image is a dark
background, a bright thorax ellipse with two darker lung lobes, rib stripes,
low-frequency texture and Poisson + Gaussian noise. Labels (class-balanced,
`label = index % num_classes`):
  0: normal (no lesion, empty mask)
  1: one to three small round bright nodules
  2: a large irregular diffuse opacity
  3: a ring-shaped cavity (bright wall, dark centre)
  4: an elongated bright band (atelectasis-like streak)
The mask marks lesion pixels with the label id (binary foreground = mask > 0).

`Phantoms3D` is the volume counterpart for 3-D methods (data=phantoms3d): a textured
ellipsoid "organ", normal or with bright/dark blob lesions, float32 (D, H, W, C) in [0, 1]
with a lesion mask (its docstring).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, check_split

CLASS_NAMES = ("normal", "nodule", "opacity", "cavity", "band")
DEFAULT_NUM_EXAMPLES = {"train": 2048, "val": 256, "test": 256}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _split_size(split: str, channels: int,
                num_examples: int | Mapping[str, int] | None) -> int:
  """Checks the split and channels; the number of examples of `split`."""
  check_split(split, allow_all=False)
  if channels not in (1, 3):
    raise DataError(f"channels must be 1 or 3, got {channels}")
  if num_examples is None or isinstance(num_examples, Mapping):
    num_examples = {**DEFAULT_NUM_EXAMPLES, **(num_examples or {})}[split]
  return int(num_examples)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
  """Soft indicator of x < 0: 1 inside, 0 outside, linear over `width`."""
  return np.clip(0.5 - x / width, 0.0, 1.0)


class Phantoms(Source):
  """Radiograph-like phantoms: uint8 (S, S, C) image, int32 label, uint8 mask."""

  def __init__(self, split: str = "train", *,
               num_examples: int | Mapping[str, int] | None = None, image_size: int = 64,
               channels: int = 1, num_classes: int = 3, seed: int = 0):
    self.split, self.num_examples = split, _split_size(split, channels, num_examples)
    if not 2 <= num_classes <= len(CLASS_NAMES):
      raise DataError(f"Phantoms supports num_classes in [2, {len(CLASS_NAMES)}], "
                      f"got {num_classes}")
    if image_size < 16:
      raise DataError(f"image_size must be at least 16, got {image_size}")
    self.image_size, self.channels = image_size, channels
    self.num_classes, self.seed = num_classes, seed
    lin = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    self._yy, self._xx = np.meshgrid(lin, lin, indexing="ij")
    self.info = SourceInfo(name="phantoms", num_classes=num_classes,
                           class_names=CLASS_NAMES[:num_classes], channels=channels,
                           has_mask=True, num_mask_classes=num_classes)

  @property
  def labels(self) -> np.ndarray:
    """All labels (int32) without generating images."""
    return (np.arange(self.num_examples) % self.num_classes).astype(np.int32)

  def _num_elements(self) -> int:
    return self.num_examples

  def _load(self, index: int) -> Record:
    rng = np.random.default_rng((self.seed, _SPLIT_IDS[self.split], index))
    label = index % self.num_classes
    image, lungs = self._anatomy(rng)
    mask = np.zeros(image.shape, np.uint8)
    if label:
      lesion, region = self._lesion(rng, label, lungs)
      image += lesion
      mask[region] = label
    image = self._noise(rng, image)
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None]
    if self.channels == 3:
      image = np.repeat(image, 3, axis=-1)
    return {"image": image, "label": np.int32(label), "mask": mask}

  def _anatomy(self, rng: np.random.Generator):
    yy, xx = self._yy, self._xx
    y, x = yy[:, 0], xx[0]
    px = 2.0 / self.image_size
    u = rng.uniform(size=12).tolist()
    cx, cy = 0.06 * (u[0] - 0.5), 0.06 * (u[1] - 0.5)
    body_a, body_b = 0.78 + 0.12 * u[2], 0.85 + 0.1 * u[3]
    # r^2 - 1 ~ 2 (r - 1) near the edge: soft ellipses without a sqrt.
    body_r2 = ((xx - cx) / body_a) ** 2 + ((yy - cy) / body_b) ** 2
    image = 0.06 + 0.04 * u[4] + (0.5 + 0.15 * u[5]) * _ramp(body_r2 - 1, 8 * px / body_a)
    lungs = []
    lung_depth = 0.28 + 0.08 * u[6]
    for side in (-1, 1):
      lx, ly = cx + side * (0.36 + 0.04 * u[7]), cy - 0.05 + 0.06 * (u[8] - 0.5)
      la, lb = 0.24 + 0.05 * u[9], 0.5 + 0.08 * u[10]
      r2 = ((xx - lx) / la) ** 2 + ((yy - ly) / lb) ** 2
      inside = _ramp(r2 - 1, 10 * px / la)
      image -= lung_depth * inside * (1.0 - 0.25 * r2)
      lungs.append((lx, ly, la, lb, inside))
    lung_any = np.maximum(lungs[0][4], lungs[1][4])
    # Separable cosines (cos(a + b) = cos a cos b - sin a sin b) via outer products.
    freq, phase, bend = 11 + 3 * u[11], rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.4)
    a, b = freq * bend * (x - cx) ** 2, freq * y + phase
    ribs = np.outer(np.cos(b), np.cos(a)) - np.outer(np.sin(b), np.sin(a))
    ribs *= ribs
    image += 0.05 * (ribs * ribs * ribs) * lung_any
    k = rng.normal(size=(2, 4)) * 2.5
    amp, ph = rng.uniform(0.01, 0.03, size=4), rng.uniform(0, 2 * np.pi, size=4)
    ay, ax = np.outer(y, k[1]) + ph, np.outer(x, k[0])
    texture = (np.cos(ay) * amp) @ np.cos(ax).T - (np.sin(ay) * amp) @ np.sin(ax).T
    return image + texture.astype(np.float32), lungs

  def _lesion(self, rng: np.random.Generator, label: int, lungs):
    """Returns (intensity change, boolean region) of a lesion of class `label`."""
    yy, xx = self._yy, self._xx
    px = 2.0 / self.image_size
    lx, ly, la, lb, _ = lungs[rng.integers(2)]

    def spot(scale: float):
      t, s = rng.uniform(0, 2 * np.pi), float(np.sqrt(rng.uniform(0, 1))) * scale
      return lx + la * s * float(np.cos(t)), ly + lb * s * float(np.sin(t))

    if label == 1:  # nodules
      delta, region = np.zeros_like(xx), np.zeros(xx.shape, bool)
      for _ in range(rng.integers(1, 4)):
        x0, y0 = spot(0.6)
        radius = max(rng.uniform(0.06, 0.1), 2.2 * px)
        d = np.sqrt((xx - x0) ** 2 + (yy - y0) ** 2)
        delta = np.maximum(delta, 0.4 * _ramp(d - radius, 1.5 * px))
        region |= d < radius
      return delta, region
    x0, y0 = spot(0.4)
    d = np.sqrt((xx - x0) ** 2 + (yy - y0) ** 2)
    theta = np.arctan2(yy - y0, xx - x0)
    if label == 2:  # irregular diffuse opacity
      radius = rng.uniform(0.2, 0.28)
      h = rng.uniform(0.08, 0.2, size=3).tolist()
      p = rng.uniform(0, 2 * np.pi, size=3).tolist()
      wobble = 1 + sum(h[i] * np.cos((i + 2) * theta + p[i]) for i in range(3))
      edge = d - radius * wobble
      return 0.25 * _ramp(edge, 0.08), edge < 0
    if label == 3:  # ring cavity
      radius, wall = rng.uniform(0.12, 0.17), rng.uniform(0.035, 0.05)
      ring = 0.45 * _ramp(np.abs(d - radius) - wall / 2, 1.5 * px)
      hole = -0.15 * _ramp(d - (radius - wall / 2), 1.5 * px)
      return ring + hole, d < radius + wall / 2
    angle = rng.uniform(-0.6, 0.6)  # label 4: elongated band
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    along = (xx - x0) * cos + (yy - y0) * sin
    across = (yy - y0) * cos - (xx - x0) * sin
    length, width = rng.uniform(0.2, 0.3), rng.uniform(0.035, 0.05)
    edge = np.maximum(np.abs(along) - length, np.abs(across) - width)
    return 0.35 * _ramp(edge, 1.5 * px), edge < 0

  @staticmethod
  def _noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    photons = rng.uniform(150, 400)
    image = rng.poisson(np.clip(image, 0, None) * photons).astype(np.float32) / photons
    return image + rng.standard_normal(size=image.shape, dtype=np.float32) * 0.015


# ---------------------------------------------------------------- 3-D phantoms

CLASS_NAMES_3D = ("normal", "abnormal")


class Phantoms3D(Source):
  """Volume phantoms for 3-D methods: float32 (D, H, W, C) in [0, 1], label, lesion mask.

  Every element is generated on access from `np.random.default_rng((seed, split_id,
  index))`, like `Phantoms`. A volume is a dim body ellipsoid holding a brighter
  ellipsoidal "organ" (random centre and semi-axes) with low-frequency texture and
  Gaussian noise. Labels alternate (`label = index % 2`):
    0: normal (the organ only; empty mask)
    1: abnormal: 1 to `max_lesions` spherical blob lesions at random positions inside
       the organ, each bright or dark (+-0.3 against the organ's 0.5), with soft edges.
  "mask" (D, H, W) uint8 marks lesion voxels with 1, so a CAM can be scored against it.
  Coordinates run over [-1, 1] on every axis, so shapes stretch with `volume_size`.
  """

  def __init__(self, split: str = "train", *,
               num_examples: int | Mapping[str, int] | None = None,
               volume_size: tuple[int, int, int] = (32, 32, 32), channels: int = 1,
               max_lesions: int = 3, seed: int = 0):
    self.split, self.num_examples = split, _split_size(split, channels, num_examples)
    size = tuple(int(s) for s in volume_size)
    if len(size) != 3 or min(size) < 8:
      raise DataError(f"volume_size must be (D, H, W) with every side >= 8, got {volume_size}")
    if max_lesions < 1:
      raise DataError(f"max_lesions must be at least 1, got {max_lesions}")
    self.volume_size, self.channels = size, channels
    self.max_lesions, self.seed = int(max_lesions), seed
    lin = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1 for n in size]
    self._zyx = (lin[0][:, None, None], lin[1][None, :, None], lin[2][None, None, :])
    self.info = SourceInfo(name="phantoms3d", num_classes=2, class_names=CLASS_NAMES_3D,
                           channels=channels, has_mask=True, num_mask_classes=2,
                           image_dtype="float32")

  @property
  def labels(self) -> np.ndarray:
    """All labels (int32) without generating volumes."""
    return (np.arange(self.num_examples) % 2).astype(np.int32)

  def _num_elements(self) -> int:
    return self.num_examples

  def _load(self, index: int) -> Record:
    rng = np.random.default_rng((self.seed, _SPLIT_IDS[self.split], index))
    label = index % 2
    z, y, x = self._zyx
    voxel = 2.0 / min(self.volume_size)
    body = ((z / 0.95) ** 2 + (y / 0.9) ** 2 + (x / 0.9) ** 2) - 1
    centre = rng.uniform(-0.08, 0.08, size=3)
    axes = rng.uniform(0.55, 0.72, size=3)
    rel = [(c - c0) / a for c, c0, a in zip((z, y, x), centre, axes)]
    organ = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - 1
    image = 0.12 * _ramp(body, 4 * voxel) + 0.38 * _ramp(organ, 3 * voxel)
    k, phase = rng.uniform(1.5, 4.0, size=(3, 3)), rng.uniform(0, 2 * np.pi, size=(3, 3))
    for i, amp in enumerate(rng.uniform(0.02, 0.04, size=3)):
      image = image + amp * (np.cos(k[i, 0] * z + phase[i, 0]) * np.cos(k[i, 1] * y + phase[i, 1])
                             * np.cos(k[i, 2] * x + phase[i, 2]))
    mask = np.zeros(self.volume_size, np.uint8)
    if label:
      for _ in range(rng.integers(1, self.max_lesions + 1)):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        at = centre + axes * direction * rng.uniform(0.0, 0.55)
        radius = max(rng.uniform(0.14, 0.22), 2.5 * voxel)
        d = np.sqrt((z - at[0]) ** 2 + (y - at[1]) ** 2 + (x - at[2]) ** 2)
        image = image + rng.choice((-0.3, 0.3)) * _ramp(d - radius, 2 * voxel)
        mask[d < radius] = 1
    image = image + rng.standard_normal(size=self.volume_size, dtype=np.float32) * 0.02
    image = np.clip(image, 0, 1).astype(np.float32)[..., None]
    if self.channels == 3:
      image = np.repeat(image, 3, axis=-1)
    return {"image": image, "label": np.int32(label), "mask": mask}
