"""Single-image augmentation ops as pure `jnp` functions (jit- and vmap-friendly).

Every op takes one float32 image (H, W, C) with values in [0, 1] and C in {1, 3},
and returns an image of the same dtype with values in [0, 1]. Magnitudes
(degrees, factors, sigma, lambda, thresholds) may be traced scalars, so a
magnitude drawn at random inside a jitted step works without recompiling.
Shapes, channel counts and fill modes are static.

The ops are those of the strong augmentation of DCL-CsTP (Ye et al., IEEE
Access 2025, Sec. III-C-1: rotate, resized crop, color jitter, autocontrast,
equalize, sharpness, brightness and Poisson noise perturbation) and of the
standard SimCLR / MoCo-v2 / CAMContrast pipelines (flip, grayscale, blur,
solarize). Enhancement ops follow the usual image-library definitions as
blends between the image and a degenerate image.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
# ITU-R 601-2 luma weights, the usual RGB -> grey conversion.
_LUMA = (0.299, 0.587, 0.114)
# Tries for the random-resized-crop box before the centre-crop fallback.
_CROP_TRIES = 10


def _clip(img: Array) -> Array:
  return jnp.clip(img, 0.0, 1.0)


def _blend(img: Array, degenerate: Array, factor: Array | float) -> Array:
  """degenerate + factor * (img - degenerate), clipped: factor 1 is identity."""
  return _clip(degenerate + factor * (img - degenerate))


def _check(img: Array) -> None:
  if img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f"augment ops take one (H, W, C) image with C in {{1, 3}}, "
                     f"got shape {img.shape}; vmap over the batch axis")


def out_hw(size: int | Sequence[int] | None, img: Array) -> tuple[int, int]:
  """Static (height, width) from an int, an (h, w) pair, or None (= input size)."""
  if size is None:
    return int(img.shape[0]), int(img.shape[1])
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


# ----------------------------------------------------------------------------- geometry


def hflip(img: Array) -> Array:
  """Mirrors the image left-right."""
  return img[:, ::-1, :]


def rotate(img: Array, degrees: Array | float, fill: str = "zero") -> Array:
  """Rotates counter-clockwise by `degrees` about the image centre (bilinear).

  Args:
    img: (H, W, C) float image.
    degrees: rotation angle; positive is counter-clockwise (as np.rot90).
    fill: "zero" fills uncovered corners with 0; "edge" repeats border pixels.

  Returns:
    The rotated image, same shape. `degrees=0` returns `img` exactly.
  """
  _check(img)
  if fill not in ("zero", "edge"):
    raise ValueError(f"rotate fill must be 'zero' or 'edge', got {fill!r}")
  h, w = img.shape[:2]
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                        jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
  # Inverse map: the output pixel (y, x) samples the input at R(-theta) (y, x) in
  # image coordinates (y pointing down).
  src_y = cy + sin * xx + cos * yy
  src_x = cx + cos * xx - sin * yy
  mode = "constant" if fill == "zero" else "nearest"
  sample = lambda ch: ndimage.map_coordinates(ch, [src_y, src_x], order=1, mode=mode, cval=0.0)
  return _clip(jax.vmap(sample, in_axes=-1, out_axes=-1)(img))


# Uniforms used by `crop_box_from_uniform`: area and aspect per try, then top and left.
CROP_UNIFORMS = 2 * _CROP_TRIES + 2


def crop_box_from_uniform(u: Array, height: int, width: int,
                          scale: tuple[Array | float, Array | float] = (0.2, 1.0),
                          ratio: tuple[Array | float, Array | float] = (3 / 4, 4 / 3)) -> Array:
  """Random-resized-crop box (top, left, h, w) from `CROP_UNIFORMS` uniforms in [0, 1).

  The area fraction is uniform in `scale` and the log aspect ratio (w / h)
  uniform in log(`ratio`). As in torchvision's RandomResizedCrop, 10 candidate
  boxes are drawn and the first that fits is kept; if none fits, the centre crop
  of the whole image with the aspect ratio clamped to `ratio`. Unlike
  torchvision the box is not rounded to whole pixels (the resampler is
  sub-pixel). Taking pre-drawn uniforms lets a policy draw all its random
  scalars with one PRNG call (each call site compiles to its own threefry hash,
  which dominates CPU compile time).
  """
  t = _CROP_TRIES
  lo_r = jnp.log(jnp.asarray(ratio[0], jnp.float32))
  hi_r = jnp.log(jnp.asarray(ratio[1], jnp.float32))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:t])
  aspect = jnp.exp(lo_r + (hi_r - lo_r) * u[t:2 * t])
  cw, ch = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
  fits = (cw <= width) & (ch <= height)
  first = jnp.argmax(fits)
  # Fallback: the whole image, cut to the nearest allowed aspect ratio.
  in_ratio = width / height
  fb_ratio = jnp.clip(in_ratio, jnp.exp(lo_r), jnp.exp(hi_r))
  fb_w = jnp.where(fb_ratio < in_ratio, height * fb_ratio, width)
  fb_h = jnp.where(fb_ratio < in_ratio, height, width / fb_ratio)
  any_fits = jnp.any(fits)
  bh = jnp.where(any_fits, ch[first], fb_h)
  bw = jnp.where(any_fits, cw[first], fb_w)
  top = jnp.where(any_fits, u[2 * t], 0.5) * (height - bh)
  left = jnp.where(any_fits, u[2 * t + 1], 0.5) * (width - bw)
  return jnp.stack([top, left, bh, bw]).astype(jnp.float32)


def sample_crop_box(rng: Array, height: int, width: int,
                    scale: tuple[Array | float, Array | float] = (0.2, 1.0),
                    ratio: tuple[Array | float, Array | float] = (3 / 4, 4 / 3)) -> Array:
  """Random-resized-crop box (top, left, h, w) in pixels; see `crop_box_from_uniform`."""
  u = jax.random.uniform(rng, (CROP_UNIFORMS,))
  return crop_box_from_uniform(u, height, width, scale, ratio)


def full_box(height: int, width: int) -> Array:
  """The box (top, left, h, w) covering the whole image."""
  return jnp.array([0.0, 0.0, height, width], jnp.float32)


def crop_resize(img: Array, box: Array, out_size: int | Sequence[int] | None = None) -> Array:
  """Resamples the box (top, left, h, w) of `img` to `out_size` (linear, antialiased).

  Uses `jax.image.scale_and_translate`, which builds separable resampling
  matrices from the (traced) box, so any box compiles to the same program.
  """
  _check(img)
  oh, ow = out_hw(out_size, img)
  top, left, bh, bw = box[0], box[1], box[2], box[3]
  scale = jnp.stack([oh / bh, ow / bw])
  translation = -jnp.stack([top, left]) * scale
  out = jax.image.scale_and_translate(img, (oh, ow, img.shape[-1]), (0, 1), scale, translation,
                                      method="linear", antialias=True, precision=_HIGHEST)
  return _clip(out)


def random_resized_crop(img: Array, rng: Array,
                        scale: tuple[Array | float, Array | float] = (0.2, 1.0),
                        ratio: tuple[Array | float, Array | float] = (3 / 4, 4 / 3),
                        out_size: int | Sequence[int] | None = None) -> Array:
  """Crops a random box (area fraction in `scale`, aspect in `ratio`) and resizes it.

  With scale=(1, 1) and ratio=(1, 1) on a square image this is a plain resize
  (identity when `out_size` equals the input size).
  """
  box = sample_crop_box(rng, img.shape[0], img.shape[1], scale, ratio)
  return crop_resize(img, box, out_size)


# ----------------------------------------------------------------------------- colour


def to_grayscale(img: Array) -> Array:
  """Luma (ITU-R 601-2) repeated over the input's channels; grey input is unchanged."""
  _check(img)
  if img.shape[-1] == 1:
    return img
  grey = img @ jnp.asarray(_LUMA, img.dtype)
  return jnp.repeat(grey[..., None], 3, axis=-1)


def brightness(img: Array, factor: Array | float) -> Array:
  """Blends with black: factor 0 gives black, 1 the image, >1 brighter."""
  return _clip(img * factor)


def contrast(img: Array, factor: Array | float) -> Array:
  """Blends with the mean grey level: factor 0 gives flat grey, 1 the image."""
  mean = jnp.mean(to_grayscale(img)[..., :1])
  return _blend(img, mean, factor)


def saturation(img: Array, factor: Array | float) -> Array:
  """Blends with the grayscale image (factor 0 = grey). No-op on grey images."""
  if img.shape[-1] == 1:
    return img
  return _blend(img, to_grayscale(img), factor)


def _rgb_to_hsv(img: Array) -> tuple[Array, Array, Array]:
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  v = jnp.max(img, axis=-1)
  delta = v - jnp.min(img, axis=-1)
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  h = jnp.where(v == r, (g - b) / safe,
                jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return h, s, v


def _hsv_to_rgb(h: Array, s: Array, v: Array) -> Array:
  # Branch-free form: channel n is v - v*s*clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
  def channel(n):
    k = (n + 6.0 * h) % 6.0
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def hue(img: Array, delta: Array | float) -> Array:
  """Shifts the hue by `delta` turns (in [-0.5, 0.5]). No-op on grey images."""
  if img.shape[-1] == 1:
    return img
  h, s, v = _rgb_to_hsv(img)
  return _clip(_hsv_to_rgb((h + delta) % 1.0, s, v))


_brightness_op, _contrast_op, _saturation_op, _hue_op = brightness, contrast, saturation, hue


# Uniforms used by `color_jitter_from_uniform`: brightness, contrast, saturation, hue.
JITTER_UNIFORMS = 4


def color_jitter_from_uniform(img: Array, u: Array, brightness: Array | float = 0.4,
                              contrast: Array | float = 0.4, saturation: Array | float = 0.4,
                              hue: Array | float = 0.1) -> Array:
  """Color jitter driven by `JITTER_UNIFORMS` pre-drawn uniforms in [0, 1); see `color_jitter`."""
  _check(img)

  def factor(v, s):
    lo = jnp.maximum(0.0, 1.0 - s)
    return lo + (1.0 + s - lo) * v

  img = _brightness_op(img, factor(u[0], brightness))
  img = _contrast_op(img, factor(u[1], contrast))
  if img.shape[-1] == 3:
    img = _saturation_op(img, factor(u[2], saturation))
    img = _hue_op(img, hue * (2.0 * u[3] - 1.0))
  return img


def color_jitter(img: Array, rng: Array, brightness: Array | float = 0.4,
                 contrast: Array | float = 0.4, saturation: Array | float = 0.4,
                 hue: Array | float = 0.1) -> Array:
  """Random brightness, contrast, saturation and hue (torchvision ColorJitter ranges).

  Factors are uniform in [max(0, 1 - s), 1 + s] for brightness, contrast and
  saturation, and the hue shift uniform in [-hue, hue] turns. The four are
  applied in a fixed order (brightness, contrast, saturation, hue) rather than
  a random one, which keeps one copy of each in the compiled program.
  Saturation and hue leave grey (C = 1) images unchanged. Zero strengths give
  the identity.
  """
  u = jax.random.uniform(rng, (JITTER_UNIFORMS,))
  return color_jitter_from_uniform(img, u, brightness, contrast, saturation, hue)


def autocontrast(img: Array) -> Array:
  """Maps each channel's [min, max] linearly to [0, 1]; constant channels unchanged."""
  lo = jnp.min(img, axis=(0, 1), keepdims=True)
  hi = jnp.max(img, axis=(0, 1), keepdims=True)
  span = hi - lo
  return _clip(jnp.where(span > 0, (img - lo) / jnp.where(span > 0, span, 1.0), img))


def _equalize_channel(ch: Array) -> Array:
  levels = jnp.clip(jnp.round(ch * 255.0), 0, 255).astype(jnp.int32)
  hist = jnp.bincount(levels.reshape(-1), length=256)
  cdf = jnp.cumsum(hist)
  total = levels.size
  cdf_min = jnp.min(jnp.where(hist > 0, cdf, total))
  denom = total - cdf_min
  lut = (cdf - cdf_min).astype(jnp.float32) / jnp.maximum(denom, 1).astype(jnp.float32)
  return jnp.where(denom > 0, lut[levels], ch)


def equalize(img: Array) -> Array:
  """Histogram equalization per channel over 256 levels.

  Each quantized level v maps to (cdf(v) - cdf_min) / (N - cdf_min), so the
  darkest level goes to 0, the brightest to 1, and the output histogram is as
  flat as the input's levels allow. A constant channel is returned unchanged.
  The histogram is a fixed-length `bincount` (a scatter-add), so it is jit-
  and vmap-friendly.
  """
  _check(img)
  return _clip(jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(img))


def _shifted_sum(img: Array, weights: Sequence[Sequence[float]]) -> Array:
  """Correlation with a small static kernel via shifted slices of the edge-padded image."""
  k = len(weights)
  r = k // 2
  h, w = img.shape[:2]
  padded = jnp.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
  out = jnp.zeros_like(img)
  for i in range(k):
    for j in range(k):
      if weights[i][j]:
        out = out + weights[i][j] * padded[i:i + h, j:j + w]
  return out


def sharpness(img: Array, factor: Array | float) -> Array:
  """Blends with a smoothed image: factor 0 blurs, 1 is identity, >1 sharpens.

  The smoothed image uses the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in
  the interior and keeps border pixels, the common image-library definition.
  """
  _check(img)
  kernel = [[v / 13.0 for v in row] for row in ((1, 1, 1), (1, 5, 1), (1, 1, 1))]
  smooth = _shifted_sum(img, kernel)
  h, w = img.shape[:2]
  interior = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(img, jnp.where(interior, smooth, img), factor)


def _gaussian_matrix(n: int, sigma: Array) -> Array:
  d = jnp.arange(n, dtype=jnp.float32)
  d = d[:, None] - d[None, :]
  wts = jnp.exp(-0.5 * jnp.square(d / jnp.maximum(sigma, 1e-3)))
  return wts / jnp.sum(wts, axis=1, keepdims=True)


def gaussian_blur(img: Array, sigma: Array | float) -> Array:
  """Separable Gaussian blur with standard deviation `sigma` pixels.

  The kernel is not truncated; at the borders it is renormalized over the
  pixels inside the image. It is applied as two (n, n) matrix products, which
  handles a traced `sigma` with no static kernel size. sigma -> 0 is identity.
  """
  _check(img)
  h, w = img.shape[:2]
  sigma = jnp.asarray(sigma, jnp.float32)
  out = jnp.einsum("ij,jwc->iwc", _gaussian_matrix(h, sigma), img, precision=_HIGHEST)
  out = jnp.einsum("vw,iwc->ivc", _gaussian_matrix(w, sigma), out, precision=_HIGHEST)
  return _clip(out)


def solarize(img: Array, threshold: Array | float = 0.5) -> Array:
  """Inverts pixels at or above `threshold` (1 - x); threshold 1 keeps all but 1.0."""
  return jnp.where(img >= threshold, 1.0 - img, img)


# ----------------------------------------------------------------------------- noise


# Rates below this are sampled by exact inversion, above by the skew-corrected normal quantile.
_POISSON_SWITCH = 10.0
# Inversion steps: P(X > 32) < 1e-8 for rates below the switch.
_POISSON_STEPS = 32


def poisson_from_uniform(u: Array, rate: Array) -> Array:
  """Poisson(rate) counts (as floats) from uniforms u in [0, 1), one per element, no loops.

  Rates below 10 use exact inverse-CDF sampling (the pmf recurrence
  p(k) = p(k - 1) rate / k over 32 unrolled steps, which XLA fuses into one
  elementwise kernel). Larger rates use the normal quantile z = Phi^-1(u) with
  the Cornish-Fisher skewness term and a continuity correction,
  k = floor(rate + a sqrt(rate) z + (z^2 - 1) / 6 + 1/2), where
  a = sqrt(1 - 5 / (36 rate)) removes the variance the skew term (1/18) and the
  rounding (1/12) add, so the mean and variance equal the rate. Its total
  variation distance to Poisson(rate) is 0.0022 at rate 10 and falls as 1/rate.
  The cost is fixed (one uniform per element, no while loop), unlike
  `jax.random.poisson`, whose loops run until the slowest element of the whole
  batch is done (about 20x slower on CPU for a batch of 224 px images).
  """
  small = rate < _POISSON_SWITCH
  r = jnp.where(small, rate, 0.0)
  prob = jnp.exp(-r)
  cdf, count = prob, jnp.zeros_like(rate)
  for k in range(1, _POISSON_STEPS + 1):
    count = count + (u > cdf).astype(rate.dtype)
    prob = prob * r / k
    cdf = cdf + prob
  big = jnp.maximum(rate, _POISSON_SWITCH)
  z = jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))
  spread = jnp.sqrt(big - 5.0 / 36.0)  # = a * sqrt(rate).
  approx = jnp.floor(big + spread * z + (z * z - 1.0) / 6.0 + 0.5)
  return jnp.where(small, count, jnp.maximum(approx, 0.0))


def poisson_noise(img: Array, rng: Array, lam: Array | float, exact: bool = False) -> Array:
  """Poisson noise perturbation (PNP) of DCL-CsTP (Ye et al. 2025, Sec. III-C-1).

  x' = Poisson(x * lam) / lam, clipped to [0, 1]: `lam` is the photon scale
  (expected photon count of a white pixel), so E[x'] = x and Var[x'] = x / lam
  before clipping; a larger `lam` means less noise.

  Args:
    img: (H, W, C) float image in [0, 1].
    rng: PRNG key.
    lam: photon scale (> 0), may be traced.
    exact: False (default) samples with `poisson_from_uniform` (exact below rate
      10, skew-corrected normal above; fixed cost); True uses
      `jax.random.poisson` (exact everywhere, but its while loops are slow on CPU
      and add about 2 s of CPU compile time).

  Returns:
    The perturbed image, same shape and dtype.
  """
  lam = jnp.asarray(lam, jnp.float32)
  rate = img.astype(jnp.float32) * lam
  if exact:
    counts = jax.random.poisson(rng, rate, dtype=jnp.int32).astype(jnp.float32)
  else:
    counts = poisson_from_uniform(jax.random.uniform(rng, img.shape), rate)
  return _clip(counts / lam).astype(img.dtype)
