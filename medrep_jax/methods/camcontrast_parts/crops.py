"""Fixed crops of images and heatmaps (CAMContrast Sec. 3.1-3.2, "Fixed crop training").

Each image (H x W) and its heatmap (h x w, H = s·h, W = s·w) are cut into four
non-overlapping corner crops and one centre crop, each half the image size and half the
heatmap size. Crop boxes are defined on the heatmap grid and scaled by the stride s, so an
image crop covers exactly the pixels its heatmap crop summarizes. The centre crop starts
at ((h - h/2) // 2, (w - w/2) // 2) on the heatmap grid.

Strategies (Table 3): "five" (default), "four" (corners only), "none" (the whole image,
resized to the crop size, with its whole heatmap) and "random" (whole images and heatmaps
are stored; stage 2 takes a random grid-aligned half-size crop of both at every step,
`random_aligned_crops`). The two-view baselines on random crops (SimCLR, SupCon) take one
independent random crop per view instead (`independent_crops`, Sec. 3.2: "two random
crops within each image as positive pairs"); an image and its heatmap share one box.

Volumes (Sec. 4.7: "each volume is divided into 8 non-overlapping sub-volumes and 2
center sub-volumes", 40x48x40 of 80x96x80): images (N, D, H, W, C) and heatmaps
(N, d, h, w), every box half the size on every axis, on the heatmap grid as in 2-D.
"ten" (the paper's rule) is our reading of the 2 centre sub-volumes: the 2-D five-crop
rule applied to each half of the volume along its first axis D, so the 8 octants are the
four corners of the front half (D0) and of the back half (D1), and the 2 centre boxes are
the in-plane centred boxes of the two halves (depth [0, d/2) and [d/2, d), rows and
columns centred). A single centred box would leave the 10th crop undefined; this reading
keeps 10 = 2 x 5 crops that each cover a distinct region, and every centre box meets the
other half's only at a face. "nine" (8 octants + the one box centred on all three axes)
and "eight" (octants only, the 3-D "four") are the alternatives. "none" and "random" work
on volumes as on images.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.data.imageio import resize_image
from medrep_jax.data.volumes import resize_volume

POSITIONS = ("TL", "TR", "BL", "BR", "C")
OCTANTS = tuple(f"D{z}-{p}" for z in (0, 1) for p in POSITIONS[:4])
POSITIONS_3D = OCTANTS + ("D0-C", "D1-C", "C")
STRATEGIES = ("five", "four", "none", "random", "ten", "nine", "eight")
# Fixed strategy -> (rank of its heatmaps, names of its crops in order).
FIXED = {"five": (2, POSITIONS), "four": (2, POSITIONS[:4]),
         "ten": (3, OCTANTS + ("D0-C", "D1-C")), "nine": (3, OCTANTS + ("C",)),
         "eight": (3, OCTANTS)}
WHOLE = -1  # position id of an uncropped image ("none", "random")


def positions(strategy: str) -> tuple[str, ...]:
  """Names of a fixed strategy's crops; a crop's "position" id indexes this tuple."""
  if strategy not in FIXED:
    raise ValueError(f"crop strategy {strategy!r} has no fixed boxes; fixed strategies are "
                     f"{tuple(FIXED)} (all: {STRATEGIES})")
  return FIXED[strategy][1]


def heatmap_stride(image_hw: Sequence[int], heat_hw: Sequence[int]) -> int:
  """The integer s with image = s · heatmap on every axis (2-D or 3-D); ValueError otherwise."""
  ratios = {big // small if small and big % small == 0 else None
            for big, small in zip(image_hw, heat_hw)}
  if len(image_hw) != len(heat_hw) or len(ratios) != 1 or None in ratios:
    raise ValueError(f"image size {tuple(image_hw)} is not one integer multiple of the heatmap "
                     f"size {tuple(heat_hw)}; use an image size divisible by the encoder's "
                     "total stride")
  return ratios.pop()


def crop_boxes(heat_hw: Sequence[int], strategy: str = "five") -> list[tuple[int, ...]]:
  """Boxes on the heatmap grid, in `positions(strategy)` order: (top, left, height, width)
  in 2-D, (front, top, left, depth, height, width) in 3-D (starts, then sizes).

  Raises:
    ValueError: unknown strategy, a grid of the wrong rank, or a side that is odd or
      below 2.
  """
  positions(strategy)  # raises for a strategy without fixed boxes
  rank = FIXED[strategy][0]
  shape = tuple(int(n) for n in heat_hw)
  if len(shape) != rank:
    raise ValueError(f"crop strategy {strategy!r} cuts {rank}-D heatmaps, got a grid of "
                     f"{shape}; 2-D images use 'five' or 'four', volumes 'ten' (Sec. 4.7), "
                     "'nine' or 'eight'")
  if min(shape) < 2 or any(n % 2 for n in shape):
    raise ValueError(f"fixed crops halve the heatmap; its size {shape} must be even (use an "
                     f"image size that gives an even feature map, e.g. a multiple of 2x the "
                     f"encoder stride)")
  half = tuple(n // 2 for n in shape)
  centre = tuple((n - k) // 2 for n, k in zip(shape, half))
  boxes = [corner + half for corner in itertools.product(*((0, k) for k in half))]
  if strategy in ("five", "nine"):
    boxes.append(centre + half)
  elif strategy == "ten":
    boxes += [(front,) + centre[1:] + half for front in (0, half[0])]
  return boxes


def fixed_crops(images: np.ndarray, heatmaps: np.ndarray, strategy: str = "five"
                ) -> dict[str, np.ndarray]:
  """Crops every image and heatmap (or keeps them whole); crop k of image i is row i·P + k.

  Args:
    images: (N, H, W, C) images, or (N, D, H, W, C) volumes.
    heatmaps: (N, h, w) heatmaps with H = s·h and W = s·w, or (N, d, h, w) (D = s·d too).
    strategy: one of `STRATEGIES` (fixed ones of the images' rank: `FIXED`).

  Returns:
    {"image": (N·P, H', W', C), "heatmap": (N·P, h', w', 1) float32, "position": (N·P,)
     int32 index into `positions(strategy)` (`POSITIONS` in 2-D; `WHOLE` when uncropped),
     "source": (N·P,) int64 image row}, with P = 5, 4 or 1 crops per image (10, 9, 8 or 1
     per volume, with a leading D' / d' axis).
  """
  images, heatmaps = np.asarray(images), np.asarray(heatmaps, np.float32)
  if images.ndim not in (4, 5) or heatmaps.ndim != images.ndim - 1 or \
      len(images) != len(heatmaps):
    raise ValueError(f"expected images (N, H, W, C) and heatmaps (N, h, w), or volumes "
                     f"(N, D, H, W, C) and (N, d, h, w), got {images.shape} and "
                     f"{heatmaps.shape}")
  if strategy not in STRATEGIES:
    raise ValueError(f"crop strategy {strategy!r}; expected one of {STRATEGIES}")
  s = heatmap_stride(images.shape[1:-1], heatmaps.shape[1:])
  n = len(images)
  if strategy in ("none", "random"):
    img = images
    if strategy == "none":  # Table 3: the whole image resized to the crop size
      half = tuple(k // 2 for k in images.shape[1:-1])
      resize = resize_image if len(half) == 2 else resize_volume  # volumes: float32
      img = np.stack([resize(x, half) for x in images])
    return {"image": img, "heatmap": heatmaps[..., None],
            "position": np.full(n, WHOLE, np.int32), "source": np.arange(n, dtype=np.int64)}
  boxes = crop_boxes(heatmaps.shape[1:], strategy)
  rank = heatmaps.ndim - 1
  img, heat = [], []
  for box in boxes:
    starts, sizes = box[:rank], box[rank:]
    img.append(images[(slice(None),) + tuple(slice(a * s, (a + k) * s)
                                              for a, k in zip(starts, sizes))])
    heat.append(heatmaps[(slice(None),) + tuple(slice(a, a + k) for a, k in zip(starts, sizes))])
  p = len(boxes)
  return {"image": np.stack(img, 1).reshape((n * p,) + img[0].shape[1:]),
          "heatmap": np.stack(heat, 1).reshape((n * p,) + heat[0].shape[1:] + (1,)),
          "position": np.tile(np.arange(p, dtype=np.int32), n),
          "source": np.repeat(np.arange(n, dtype=np.int64), p)}


def random_aligned_crops(rng: jax.Array, images: jax.Array, heatmaps: jax.Array | None = None,
                         stride: int = 1) -> tuple[jax.Array, jax.Array | None]:
  """A random half-size crop per example, on device (Table 3 "random crop").

  Offsets are drawn on the grid of `stride` pixels, so with heatmaps (h = H / stride) the
  image crop and the heatmap crop cover the same region.

  Args:
    rng: PRNG key.
    images: (B, H, W, C) images, or (B, D, H, W, C) volumes.
    heatmaps: optional (B, H / stride, W / stride, 1) heatmaps ((B, d, h, w, 1) for
      volumes).
    stride: pixels per heatmap cell (1 without heatmaps).

  Returns:
    (image crops (B, H/2, W/2, C), heatmap crops or None); volumes are halved on every
    axis.
  """
  b, spatial = images.shape[0], images.shape[1:-1]
  grid = [n // stride for n in spatial]
  half = [g // 2 for g in grid]
  if min(half) < 1:
    raise ValueError(f"images {images.shape} are too small for half-size crops at stride "
                     f"{stride}")
  keys = jax.random.split(rng, len(grid))  # 2-D: the (top, left) keys of split(rng)
  starts = jnp.stack([jax.random.randint(k, (b,), 0, g - c + 1)
                      for k, g, c in zip(keys, grid, half)], -1)

  def one(x, start, scale):
    return jax.lax.dynamic_slice(x, tuple(start * scale) + (0,),
                                 tuple(c * scale for c in half) + (x.shape[-1],))

  img = jax.vmap(lambda x, t: one(x, t, stride))(images, starts)
  if heatmaps is None:
    return img, None
  heat = jax.vmap(lambda x, t: one(x, t, 1))(heatmaps, starts)
  return img, heat


def independent_crops(rng: jax.Array, images: jax.Array, num_views: int = 2,
                      stride: int = 1) -> jax.Array:
  """`num_views` independent random half-size crops of every image, one per view.

  View v uses `random_aligned_crops` with the key fold_in(rng, v), so each view has its
  own crop box (SimCLR's two random crops of one image, Sec. 3.2 / 4.4), drawn like the
  single crop of `random_aligned_crops` (offsets on the grid of `stride` pixels).

  Returns:
    (num_views, B, H/2, W/2, C) crops (volumes: halved on every axis).
  """
  keys = [jax.random.fold_in(rng, v) for v in range(num_views)]
  return jnp.stack([random_aligned_crops(k, images, None, stride)[0] for k in keys])
