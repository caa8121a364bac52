"""Fixed crops of images and heatmaps (CAMContrast Sec. 3.1-3.2, "Fixed crop training").

Each image (H x W) and its heatmap (h x w, H = s·h, W = s·w) are cut into four
non-overlapping corner crops and one centre crop, each half the image size and half the
heatmap size. Crop boxes are defined on the heatmap grid and scaled by the stride s, so an
image crop covers exactly the pixels its heatmap crop summarizes. The centre crop starts
at ((h - h/2) // 2, (w - w/2) // 2) on the heatmap grid.

Strategies (Table 3): "five" (default), "four" (corners only), "none" (the whole image,
resized to the crop size, with its whole heatmap) and "random" (whole images and heatmaps
are stored; stage 2 takes a random grid-aligned half-size crop of both at every step,
`random_aligned_crops`).
"""
from __future__ import annotations

import jax
import numpy as np

from medrep_jax.data.imageio import resize_image

POSITIONS = ("TL", "TR", "BL", "BR", "C")
STRATEGIES = ("five", "four", "none", "random")
WHOLE = -1  # position id of an uncropped image ("none", "random")


def heatmap_stride(image_hw: tuple[int, int], heat_hw: tuple[int, int]) -> int:
  """The integer s with image = s · heatmap on both axes; raises ValueError otherwise."""
  (big_h, big_w), (h, w) = image_hw, heat_hw
  if big_h % h or big_w % w or big_h // h != big_w // w:
    raise ValueError(f"image size {image_hw} is not one integer multiple of the heatmap size "
                     f"{heat_hw}; use an image size divisible by the encoder's total stride")
  return big_h // h


def crop_boxes(heat_hw: tuple[int, int], strategy: str = "five"
               ) -> list[tuple[int, int, int, int]]:
  """(top, left, height, width) boxes on the heatmap grid, in `POSITIONS` order.

  Raises:
    ValueError: unknown strategy, or a heatmap side that is odd or below 2.
  """
  if strategy not in ("five", "four"):
    raise ValueError(f"crop strategy {strategy!r} has no fixed boxes; fixed strategies are "
                     f"'five' and 'four' (all: {STRATEGIES})")
  h, w = heat_hw
  if h < 2 or w < 2 or h % 2 or w % 2:
    raise ValueError(f"fixed crops halve the heatmap; its size {heat_hw} must be even (use an "
                     f"image size that gives an even feature map, e.g. a multiple of 2x the "
                     f"encoder stride)")
  hh, hw = h // 2, w // 2
  boxes = [(0, 0, hh, hw), (0, hw, hh, hw), (hh, 0, hh, hw), (hh, hw, hh, hw)]
  if strategy == "five":
    boxes.append(((h - hh) // 2, (w - hw) // 2, hh, hw))
  return boxes


def fixed_crops(images: np.ndarray, heatmaps: np.ndarray, strategy: str = "five"
                ) -> dict[str, np.ndarray]:
  """Crops every image and heatmap (or keeps them whole); crop k of image i is row i·P + k.

  Args:
    images: (N, H, W, C) images.
    heatmaps: (N, h, w) heatmaps with H = s·h and W = s·w.
    strategy: one of `STRATEGIES`.

  Returns:
    {"image": (N·P, H', W', C), "heatmap": (N·P, h', w', 1) float32, "position": (N·P,)
     int32 index into `POSITIONS` (`WHOLE` when uncropped), "source": (N·P,) int64 image
     row}, with P = 5, 4 or 1 crops per image.
  """
  images, heatmaps = np.asarray(images), np.asarray(heatmaps, np.float32)
  if images.ndim != 4 or heatmaps.ndim != 3 or len(images) != len(heatmaps):
    raise ValueError(f"expected images (N, H, W, C) and heatmaps (N, h, w), got "
                     f"{images.shape} and {heatmaps.shape}")
  if strategy not in STRATEGIES:
    raise ValueError(f"crop strategy {strategy!r}; expected one of {STRATEGIES}")
  s = heatmap_stride(images.shape[1:3], heatmaps.shape[1:3])
  n = len(images)
  if strategy in ("none", "random"):
    img = images
    if strategy == "none":  # Table 3: the whole image resized to the crop size
      half = (images.shape[1] // 2, images.shape[2] // 2)
      img = np.stack([resize_image(x, half) for x in images])
    return {"image": img, "heatmap": heatmaps[..., None],
            "position": np.full(n, WHOLE, np.int32), "source": np.arange(n, dtype=np.int64)}
  boxes = crop_boxes(heatmaps.shape[1:3], strategy)
  img = [images[:, t * s:(t + bh) * s, l * s:(l + bw) * s] for t, l, bh, bw in boxes]
  heat = [heatmaps[:, t:t + bh, l:l + bw] for t, l, bh, bw in boxes]
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
    images: (B, H, W, C) images.
    heatmaps: optional (B, H / stride, W / stride, 1) heatmaps.
    stride: pixels per heatmap cell (1 without heatmaps).

  Returns:
    (image crops (B, H/2, W/2, C), heatmap crops or None).
  """
  b, big_h, big_w, c = images.shape
  gh, gw = big_h // stride, big_w // stride
  ch, cw = gh // 2, gw // 2
  if ch < 1 or cw < 1:
    raise ValueError(f"images {images.shape} are too small for half-size crops at stride "
                     f"{stride}")
  ky, kx = jax.random.split(rng)
  top = jax.random.randint(ky, (b,), 0, gh - ch + 1)
  left = jax.random.randint(kx, (b,), 0, gw - cw + 1)

  def one(x, t, l, size, scale):
    return jax.lax.dynamic_slice(x, (t * scale, l * scale, 0),
                                 (size[0] * scale, size[1] * scale, x.shape[-1]))

  img = jax.vmap(lambda x, t, l: one(x, t, l, (ch, cw), stride))(images, top, left)
  if heatmaps is None:
    return img, None
  heat = jax.vmap(lambda x, t, l: one(x, t, l, (ch, cw), 1))(heatmaps, top, left)
  return img, heat
