"""Augmentation policies and the batched, jit/sharding-friendly view API.

Policies map (rng, one image) to one augmented image of a fixed size:
  - `strong_augment`: the RandAugment-style strong augmentation of DCL-CsTP
    (Ye et al., IEEE Access 2025, Sec. III-C-1; DESIGN.md "Views"): a random
    resized crop on every view, then `num_ops` ops drawn from the others;
    `policy_kwargs` reads its arguments from a config's `augment.strong` block.
  - `simclr_augment`: SimCLR / MoCo-v2 views (crop, flip, jitter, grey, blur).
  - `standard_augment`: CAMContrast's "standard augmentations" (Yap & Ng,
    Sec. 4.1: cropping, horizontal flipping, rotation, color jittering and
    grayscaling), with crop and rotation ranges from its Table 2.
  - `downstream_augment`: CAMContrast's downstream training augmentation (Table 2:
    resized crop, horizontal flip, rotation), applied alike to the image and its
    label maps; `downstream_kwargs` reads it from a config's `augment` block and
    `augment_labelled_batch` batches it.
  - `standard3d_augment` ("standard3d"): the standard augmentation carried over to
    (D, H, W, C) volumes for CAMContrast's 3-D pretraining (Sec. 4.7), from the ops of
    `volume`.
  - `no_augment` ("none"): the identity, on images and volumes alike.

Random choices are made with masks and `jnp.where`, never Python control flow,
so one compiled program serves every draw. Under `vmap` a `lax.switch` or
`lax.cond` with a per-example index lowers to a select over all branches
anyway, so masking costs no extra compute, and it keeps exactly one copy of
each op in the program (sequential switches over all ops would keep
`num_ops` copies, multiplying CPU compile time). Each policy draws all its random
scalars with one `jax.random.uniform` call (`_Uniforms`), since every PRNG call
site compiles to its own threefry hash; this cut CPU compile time about 3x.

`augment_batch` and `make_views` derive every example's key as
fold_in(fold_in(rng, view), index), so example i's augmentation does not depend
on the batch size, its position in a shard, or the device count. They take a batch
of images (B, H, W, C) or of volumes (B, D, H, W, C); a registered policy given the
other kind fails at once with a ValueError naming the policy and the shape.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from medrep_jax.config_lib import ConfigError
from medrep_jax.data.augment import ops, volume

Array = jax.Array
Policy = Callable[..., Array]
Size = int | Sequence[int] | None

# Ops of the strong augmentation, in the order they are applied when drawn.
STRONG_OPS = ("crop", "rotate", "color_jitter", "autocontrast", "equalize", "sharpness",
              "brightness", "pnp")
# torchvision / MoCo-v2 ColorJitter strengths (brightness, contrast, saturation, hue).
MOCO_JITTER = (0.4, 0.4, 0.4, 0.1)


class _Uniforms:
  """Hands out consecutive slices of one vector of uniforms in [0, 1).

  A policy draws all its random scalars with a single PRNG call: every PRNG call
  site compiles to its own threefry hash, and those dominate CPU compile time.
  """

  def __init__(self, rng: Array, n: int):
    self._u, self._next = jax.random.uniform(rng, (n,)), 0

  def take(self, n: int | None = None) -> Array:
    start, self._next = self._next, self._next + (1 if n is None else n)
    if self._next > self._u.shape[0]:
      raise ValueError("internal: _Uniforms exhausted")  # A policy miscounted its draws.
    return self._u[start] if n is None else self._u[start:self._next]


def random_subset_mask(u: Array, k: int) -> Array:
  """Boolean mask of a uniformly random k-subset: the k smallest of the uniforms `u`."""
  return jnp.argsort(jnp.argsort(u)) < k


def _resize_box(u: Array, img: Array, scale, ratio, apply: Array | bool = True) -> Array:
  h, w = img.shape[:2]
  box = ops.crop_box_from_uniform(u, h, w, scale, ratio)
  return jnp.where(apply, box, ops.full_box(h, w))


CROP_MODES = ("always", "drawn")


def _strong_op_sets(op_names: Sequence[str], num_ops: int, crop_mode: str,
                    keys: Sequence[str] = ("op_names", "num_ops", "crop_mode"),
                    where: str = "strong_augment: ") -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Checks the static arguments of `strong_augment`; returns (ops, drawn ops) in
  application order. `keys` name the arguments (or config keys) in the errors."""
  ops_key, num_ops_key, mode_key = keys
  if isinstance(op_names, str):
    raise ValueError(f"{where}{ops_key} must be a sequence of op names, got {op_names!r}")
  unknown = set(op_names) - set(STRONG_OPS)
  if unknown:
    raise ValueError(f"{where}{ops_key} has unknown ops {sorted(unknown)}; "
                     f"choose from {STRONG_OPS}")
  if crop_mode not in CROP_MODES:
    raise ValueError(f"{where}{mode_key}={crop_mode!r}; expected one of {CROP_MODES}")
  names = tuple(name for name in STRONG_OPS if name in op_names)  # Application order.
  drawn = tuple(n for n in names if not (crop_mode == "always" and n == "crop"))
  if isinstance(num_ops, bool) or not isinstance(num_ops, int) or not 0 <= num_ops <= len(drawn):
    always = " (the crop is applied on top: crop_mode='always')" if drawn != names else ""
    raise ValueError(f"{where}{num_ops_key}={num_ops!r} must be an int in [0, {len(drawn)}], "
                     f"the number of ops drawn from {drawn}{always}")
  return names, drawn


def strong_augment(rng: Array, img: Array, out_size: Size = None, *, num_ops: int = 2,
                   magnitude: tuple[float, float] = (0.0, 1.0),
                   op_names: Sequence[str] = STRONG_OPS, rotate_degrees: float = 30.0,
                   crop_scale: tuple[float, float] = (0.2, 1.0),
                   crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   jitter: Sequence[float] = MOCO_JITTER, enhance: float = 0.9,
                   pnp_lam: tuple[float, float] = (25.0, 1000.0), pnp_exact: bool = False,
                   fill: str = "zero", crop_mode: str = "always") -> Array:
  """RandAugment-style strong augmentation of DCL-CsTP (Ye et al. 2025, Sec. III-C-1).

  The ops are those of the paper (by default all eight: rotate, resized crop,
  color jitter, autocontrast, equalize, sharpness, brightness and Poisson noise
  perturbation), restricted to `op_names`. How the random resized crop is used
  depends on `crop_mode`:
    "always" (default; the paper's description, where every view is a random
        resized crop): the crop is applied to every view and `num_ops` distinct
        ops are drawn uniformly from the other ops of `op_names`;
    "drawn" (the behaviour before this switch): the crop is one of the ops a
        uniformly random subset of `num_ops` is drawn from, so it reaches only
        about num_ops / len(op_names) of the views (1/4 with the defaults).
  Without "crop" in `op_names` no view is cropped in either mode. Each op
  (the always-on crop too) gets its own magnitude m ~ U(magnitude), m in [0, 1]:
    crop:         area fraction in [1 - m (1 - crop_scale[0]), crop_scale[1]], aspect in crop_ratio
    rotate:       +-m * rotate_degrees
    color_jitter: strengths m * jitter
    sharpness, brightness: factor 1 +- m * enhance (RandAugment's [0.1, 1.9] at m = 1)
    pnp:          photon scale lam log-interpolated from pnp_lam[1] (m = 0) to pnp_lam[0]
    autocontrast, equalize: no magnitude.
  Chosen ops run in the fixed order of `STRONG_OPS` (RandAugment draws an order;
  a fixed order keeps the program small and is a documented deviation). The
  output is resized to `out_size` whether or not the crop is drawn. The paper
  names the ops but not their ranges; the defaults are RandAugment / MoCo-v2
  conventions, and pnp_lam = (25, 1000) gives a noise std of 0.14 to 0.022 at x = 0.5.
  `num_ops` and `op_names` are static (they shape the program); magnitudes are drawn
  on device.

  Args:
    rng: PRNG key for this image.
    img: (H, W, C) float32 image in [0, 1].
    out_size: output size (int or (h, w)); None keeps the input size.
    num_ops: how many ops to draw (RandAugment's N); with crop_mode="always"
      they are drawn from the ops other than the crop, which comes on top.
    magnitude: range of the per-op magnitude m (RandAugment's M, randomized).
    op_names: the ops to draw from (a subset of STRONG_OPS), e.g. without "pnp"
      for an ablation.
    rotate_degrees, crop_scale, crop_ratio, jitter, enhance, pnp_lam: op ranges at m = 1.
    pnp_exact: sample PNP with `jax.random.poisson` instead of the fixed-cost
      sampler (see `ops.poisson_noise`).
    fill: rotation fill, "zero" or "edge".
    crop_mode: "always" (crop every view) or "drawn" (the crop is one of the
      drawn ops); see above.

  Returns:
    The augmented (out_h, out_w, C) float32 image in [0, 1].
  """
  names, drawn = _strong_op_sets(op_names, num_ops, crop_mode)
  n = len(names)
  k_uniform, k_pnp = jax.random.split(rng)
  draws = _Uniforms(k_uniform, len(drawn) + 2 * n + ops.CROP_UNIFORMS + ops.JITTER_UNIFORMS)
  # A uniform random subset: the num_ops ops with the smallest uniform keys.
  chosen = random_subset_mask(draws.take(len(drawn)), num_ops)
  mag = magnitude[0] + (magnitude[1] - magnitude[0]) * draws.take(n)
  sign = jnp.where(draws.take(n) < 0.5, 1.0, -1.0)
  on = {name: True for name in names if name not in drawn}  # The always-on crop.
  on.update(zip(drawn, chosen))
  m = dict(zip(names, mag))
  signed = {name: sg * mg for name, sg, mg in zip(names, sign, mag)}
  crop_u, jitter_u = draws.take(ops.CROP_UNIFORMS), draws.take(ops.JITTER_UNIFORMS)

  # Ops not in op_names are left out of the program entirely.
  if "crop" in names:
    lo_scale = 1.0 - m["crop"] * (1.0 - crop_scale[0])
    box = _resize_box(crop_u, img, (lo_scale, crop_scale[1]), crop_ratio, on["crop"])
  else:
    box = ops.full_box(*img.shape[:2])
  x = ops.crop_resize(img, box, out_size)
  if "rotate" in names:
    x = jnp.where(on["rotate"], ops.rotate(x, signed["rotate"] * rotate_degrees, fill), x)
  if "color_jitter" in names:
    strengths = [m["color_jitter"] * j for j in jitter]
    x = jnp.where(on["color_jitter"], ops.color_jitter_from_uniform(x, jitter_u, *strengths), x)
  if "autocontrast" in names:
    x = jnp.where(on["autocontrast"], ops.autocontrast(x), x)
  if "equalize" in names:
    x = jnp.where(on["equalize"], ops.equalize(x), x)
  if "sharpness" in names:
    x = jnp.where(on["sharpness"], ops.sharpness(x, 1.0 + signed["sharpness"] * enhance), x)
  if "brightness" in names:
    x = jnp.where(on["brightness"], ops.brightness(x, 1.0 + signed["brightness"] * enhance), x)
  if "pnp" in names:
    log_lo, log_hi = math.log(pnp_lam[0]), math.log(pnp_lam[1])
    lam = jnp.exp(log_hi + m["pnp"] * (log_lo - log_hi))
    x = jnp.where(on["pnp"], ops.poisson_noise(x, k_pnp, lam, pnp_exact), x)
  return x


def simclr_augment(rng: Array, img: Array, out_size: Size = None, *,
                   scale: tuple[float, float] = (0.2, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                   jitter: Sequence[float] = MOCO_JITTER, jitter_p: float = 0.8,
                   grayscale_p: float = 0.2, blur_p: float = 0.5,
                   blur_sigma: tuple[float, float] = (0.1, 2.0)) -> Array:
  """SimCLR / MoCo-v2 view: resized crop, flip, color jitter (p=0.8), grey (p=0.2), blur (p=0.5).

  Defaults are MoCo-v2's (crop scale (0.2, 1), jitter 0.4/0.4/0.4/0.1, blur sigma
  in [0.1, 2] pixels); SimCLR's are scale=(0.08, 1.0) and jitter=(0.8, 0.8, 0.8, 0.2).
  """
  draws = _Uniforms(rng, ops.CROP_UNIFORMS + ops.JITTER_UNIFORMS + 6)
  x = ops.crop_resize(img, _resize_box(draws.take(ops.CROP_UNIFORMS), img, scale, ratio), out_size)
  x = jnp.where(draws.take() < flip_p, ops.hflip(x), x)
  jittered = ops.color_jitter_from_uniform(x, draws.take(ops.JITTER_UNIFORMS), *jitter)
  x = jnp.where(draws.take() < jitter_p, jittered, x)
  x = jnp.where(draws.take() < grayscale_p, ops.to_grayscale(x), x)
  sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * draws.take()
  x = jnp.where(draws.take() < blur_p, ops.gaussian_blur(x, sigma), x)
  return x


def _per_channel(op: Callable[[Array], Array]) -> Callable[[Array], Array]:
  """`op` (an (H, W, 1) -> (h, w, 1) image op) applied to each channel of an (H, W, K) map."""
  return jax.vmap(lambda ch: op(ch[..., None])[..., 0], in_axes=-1, out_axes=-1)


def _crop_flip_rotate(draws: _Uniforms, img: Array, out_size: Size, scale, ratio,
                      flip_p: float, degrees: float, fill: str, onehots: Sequence[Array] = (),
                      crop: bool = True) -> tuple[Array, list[Array]]:
  """Resized crop -> horizontal flip (p = flip_p) -> rotation U(-degrees, degrees).

  Takes `CROP_UNIFORMS + 2` uniforms from `draws` (crop, flip, angle: the order
  `standard_augment` has always drawn them) and applies the same geometry to `img`
  and to every (H, W, K) one-hot label map of `onehots`, channel by channel (the
  ops take C in {1, 3}). Parts at a static identity are left out of the program:
  the crop when `crop` is False, the flip at flip_p <= 0, the rotation at 0 degrees
  (each would return its input unchanged). Returns (image, [transformed maps]).
  """
  box = _resize_box(draws.take(ops.CROP_UNIFORMS), img, scale, ratio)
  flip = draws.take() < flip_p
  angle = degrees * (2.0 * draws.take() - 1.0)
  static = lambda v: isinstance(v, (int, float))

  def geometry(x: Array) -> Array:
    if crop:
      x = ops.crop_resize(x, box, out_size)
    if not (static(flip_p) and flip_p <= 0):
      x = jnp.where(flip, ops.hflip(x), x)
    if not (static(degrees) and degrees == 0):
      x = ops.rotate(x, angle, fill)
    return x

  return geometry(img), [_per_channel(geometry)(m) for m in onehots]


def standard_augment(rng: Array, img: Array, out_size: Size = None, *,
                     scale: tuple[float, float] = (0.8, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                     degrees: float = 30.0, jitter: Sequence[float] = MOCO_JITTER,
                     jitter_p: float = 0.8, grayscale_p: float = 0.2,
                     fill: str = "zero") -> Array:
  """CAMContrast's standard augmentation (Yap & Ng, Sec. 4.1 and Table 2).

  Resized crop (scale (0.8, 1), aspect (3/4, 4/3)), horizontal flip (p=0.5),
  rotation uniform in [-degrees, degrees] (Table 2's chest X-ray +-30), color
  jitter (p=0.8) and grayscale (p=0.2). The paper does not state jitter or
  grayscale parameters; these are the SimCLR / MoCo-v2 ones.
  """
  draws = _Uniforms(rng, ops.CROP_UNIFORMS + ops.JITTER_UNIFORMS + 4)
  x = _crop_flip_rotate(draws, img, out_size, scale, ratio, flip_p, degrees, fill)[0]
  jittered = ops.color_jitter_from_uniform(x, draws.take(ops.JITTER_UNIFORMS), *jitter)
  x = jnp.where(draws.take() < jitter_p, jittered, x)
  x = jnp.where(draws.take() < grayscale_p, ops.to_grayscale(x), x)
  return x


def downstream_augment(rng: Array, img: Array, labels: dict[str, Array] | None = None, *,
                       label_classes: dict[str, int] | None = None,
                       scale: tuple[float, float] = (1.0, 1.0),
                       ratio: tuple[float, float] = (1.0, 1.0), flip_p: float = 0.0,
                       degrees: float = 0.0, fill: str = "zero"
                       ) -> tuple[Array, dict[str, Array]]:
  """The downstream training augmentation of CAMContrast Table 2 (Yap & Ng).

  torchvision's RandomResizedCrop(scale, ratio) at the input size, RandomHorizontalFlip(
  flip_p) and RandomRotation(degrees) (uniform in [-degrees, degrees], corners filled per
  `fill`), in that order. Table 2's columns: classification scale (0.8, 1), ratio
  (0.75, 1.33); segmentation scale 1, ratio 1; flip 0.5 everywhere; rotation 0 (fundus
  classification), 90 (fundus segmentation) or 30 (chest X-ray). The defaults are the
  identity, and a part whose range is the identity (scale = ratio = (1, 1): Table 2's
  "1.0", the whole image; degrees 0; flip_p 0) is left out of the program.

  Label maps (a segmentation mask, a field-of-view mask) get the same geometry: each is
  one-hot encoded over its `label_classes[key]` classes, resampled like the image and
  turned back into labels by argmax, so a label never blends into another and corners
  that the rotation uncovers become class 0.

  Args:
    rng: PRNG key for this example.
    img: (H, W, C) float32 image in [0, 1], C in {1, 3}.
    labels: {key: (H, W) integer label map}.
    label_classes: {key: number of classes} for every key of `labels` (static).
    scale, ratio, flip_p, degrees, fill: the Table 2 parameters (see above).

  Returns:
    (augmented image (H, W, C), {key: augmented (H, W) label map, dtype kept}).
  """
  labels = dict(labels or {})
  classes = dict(label_classes or {})
  missing = sorted(set(labels) - set(classes))
  if missing:
    raise ValueError(f"downstream_augment: label_classes has no class count for {missing}")
  crop = tuple(scale) != (1.0, 1.0) or tuple(ratio) != (1.0, 1.0)
  if not crop and flip_p <= 0 and degrees == 0:
    return img, labels
  draws = _Uniforms(rng, ops.CROP_UNIFORMS + 2)
  onehots = [jax.nn.one_hot(labels[k], int(classes[k]), dtype=jnp.float32) for k in labels]
  x, maps = _crop_flip_rotate(draws, img, None, scale, ratio, flip_p, degrees, fill, onehots,
                              crop=crop)
  return x, {k: jnp.argmax(m, -1).astype(labels[k].dtype) for k, m in zip(labels, maps)}


def standard3d_augment(rng: Array, vol: Array, out_size: Size = None, *,
                       scale: tuple[float, float] = (0.8, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                       degrees: float = 30.0, jitter: Sequence[float] = (0.4, 0.4),
                       jitter_p: float = 0.8, flip_axes: Sequence[int | str] = ("w",),
                       fill: str = "zero") -> Array:
  """CAMContrast's standard augmentation on one volume (Yap & Ng, Sec. 4.7; "standard3d").

  Sec. 4.7 keeps the 2-D pretraining pipeline for the 3-D ADNI runs, so this is
  `standard_augment` carried over to (D, H, W, C) volumes, in the same order:
    1. 3-D random resized crop (volume fraction in `scale`, in-plane and depth aspects
       in `ratio`; `volume.crop_box3d_from_uniform`) resampled trilinearly to
       `out_size` (`volume.out_dhw`: None keeps the input size);
    2. a flip along each of `flip_axes` with probability `flip_p` each (default the
       left-right axis only, the 2-D horizontal flip);
    3. the same in-plane rotation, uniform in [-degrees, degrees], of every axial
       slice (`volume.rotate_volume`);
    4. with probability `jitter_p`, brightness and contrast jitter of strengths
       `jitter` = (brightness, contrast), one draw for the whole volume.
  There is no hue, saturation or grayscale step: volumes are single-channel (MRI,
  CT), where those are identities. Parts at a static identity (flip_p <= 0,
  degrees = 0) are left out of the program; scale = ratio = (1, 1), flip_p = 0,
  degrees = 0 and jitter_p = 0 return the input (up to resampling rounding, about
  1e-6) on volumes with square slices.

  Args:
    rng: PRNG key for this volume.
    vol: (D, H, W, C) float32 volume in [0, 1], C in {1, 3}.
    out_size: int (cube), (h, w) (depth kept) or (d, h, w); None keeps the input size.
    scale, ratio, flip_p, degrees, jitter, jitter_p: as `standard_augment` (`jitter`
      takes (brightness, contrast), or up to 4 strengths for C = 3).
    flip_axes: spatial axes flipped independently (0 / "d", 1 / "h", 2 / "w"); static.
    fill: rotation fill, "zero" or "edge".

  Returns:
    The augmented (out_d, out_h, out_w, C) float32 volume in [0, 1].
  """
  volume.check_volume(vol, "augmentation policy 'standard3d'")
  flip_axes = tuple(flip_axes)
  static = lambda v: isinstance(v, (int, float))
  draws = _Uniforms(rng, volume.CROP3D_UNIFORMS + len(flip_axes) + ops.JITTER_UNIFORMS + 2)
  box = volume.crop_box3d_from_uniform(draws.take(volume.CROP3D_UNIFORMS), *vol.shape[:3],
                                       scale, ratio)
  x = volume.crop_resize_volume(vol, box, out_size)
  flips = draws.take(len(flip_axes))
  if not (static(flip_p) and flip_p <= 0):
    for i, axis in enumerate(flip_axes):
      x = jnp.where(flips[i] < flip_p, volume.flip_volume(x, axis), x)
  angle = degrees * (2.0 * draws.take() - 1.0)
  if not (static(degrees) and degrees == 0):
    x = volume.rotate_volume(x, angle, fill)
  jittered = volume.color_jitter_volume_from_uniform(x, draws.take(ops.JITTER_UNIFORMS), *jitter)
  return jnp.where(draws.take() < jitter_p, jittered, x)


def no_augment(rng: Array, img: Array, *args: Any, **kwargs: Any) -> Array:
  """The identity policy ("none"): returns `img` as float32 and ignores the key and any
  other arguments (out_size included). Takes one image (H, W, C) or volume (D, H, W, C),
  e.g. to pretrain without augmentation as an ablation."""
  del rng, args, kwargs
  return jnp.asarray(img).astype(jnp.float32)


POLICIES: dict[str, Policy] = {
    "strong": strong_augment,
    "simclr": simclr_augment,
    "standard": standard_augment,
    "standard3d": standard3d_augment,
    "none": no_augment,
}

# Batch ranks each registered policy takes: 4 for images (B, H, W, C), 5 for volumes
# (B, D, H, W, C). Other callables may take either.
_POLICY_RANKS: dict[Policy, tuple[int, ...]] = {
    strong_augment: (4,), simclr_augment: (4,), standard_augment: (4,),
    standard3d_augment: (5,), no_augment: (4, 5),
}
_BATCH_KINDS = {4: "images (B, H, W, C)", 5: "volumes (B, D, H, W, C)"}
_OTHER_KIND_HINT = {4: "; use 'standard3d' (or 'none') for volumes",
                    5: "; use a 2-D policy ('standard', 'simclr', 'strong') for images"}


def get_policy(policy: str | Policy) -> Policy:
  """Looks up a policy by name ("strong", "simclr", "standard", "standard3d", "none"), or
  returns a callable."""
  if callable(policy):
    return policy
  if policy not in POLICIES:
    raise ValueError(f"unknown augmentation policy {policy!r}; choose from {sorted(POLICIES)}")
  return POLICIES[policy]


# `augment.strong` config fields -> `strong_augment` keyword arguments.
STRONG_CONFIG_FIELDS = {
    "num_ops": "num_ops", "ops": "op_names", "magnitude": "magnitude",
    "rotate_degrees": "rotate_degrees", "crop_scale": "crop_scale", "crop_ratio": "crop_ratio",
    "jitter": "jitter", "enhance": "enhance", "pnp_lam": "pnp_lam", "pnp_exact": "pnp_exact",
    "fill": "fill", "crop_mode": "crop_mode",
}


def _tuples(value: Any) -> Any:
  """Config lists (and nested sequences) as tuples, so they are hashable and static."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def policy_kwargs(config: Any, prefix: str = "augment") -> dict[str, Any]:
  """The policy's keyword arguments from an `augment` config block (for `make_views`).

  For `policy="strong"` these are the fields of the nested `strong` block (see
  `STRONG_CONFIG_FIELDS`; `ops` becomes `op_names`), with lists turned into tuples;
  a missing block or field keeps `strong_augment`'s default. Other policies take no
  configured arguments ({}), so a baseline with `policy="simclr"` ignores the block.
  The fields are checked here, so a bad value fails when the method is built, not
  inside the jitted step.

  Raises:
    ConfigError: an unknown field, an unknown op, `num_ops` out of range, a bad
      `crop_mode` or magnitude range; the message names the key (e.g.
      "augment.strong.num_ops").
  """
  if config.get("policy") != "strong" or config.get("strong") is None:
    return {}
  block = dict(config["strong"])
  key = lambda field: f"{prefix}.strong.{field}"
  unknown = sorted(set(block) - set(STRONG_CONFIG_FIELDS))
  if unknown:
    raise ConfigError(f"{', '.join(key(f) for f in unknown)}: not a field of the strong "
                      f"augmentation; expected {sorted(STRONG_CONFIG_FIELDS)}")
  kwargs = {STRONG_CONFIG_FIELDS[f]: _tuples(v) for f, v in block.items()}
  defaults = {k: p.default for k, p in inspect.signature(strong_augment).parameters.items()}
  get = lambda name: kwargs.get(name, defaults[name])
  try:
    _strong_op_sets(get("op_names"), get("num_ops"), get("crop_mode"),
                    keys=(key("ops"), key("num_ops"), key("crop_mode")), where="")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for field in ("magnitude", "crop_scale", "crop_ratio", "pnp_lam"):
    value = get(STRONG_CONFIG_FIELDS[field])
    if not (isinstance(value, tuple) and len(value) == 2 and value[0] <= value[1]):
      raise ConfigError(f"{key(field)}={value!r} must be a range (lo, hi) with lo <= hi")
  lo, hi = get("magnitude")
  if not 0.0 <= lo <= hi <= 1.0:
    raise ConfigError(f"{key('magnitude')}={(lo, hi)!r} must lie in [0, 1]")
  return kwargs


# `augment` config fields of the downstream stages (CAMContrast Table 2) ->
# `downstream_augment` keyword arguments; the defaults are the identity (no augmentation).
DOWNSTREAM_CONFIG_FIELDS = {"crop_scale": "scale", "crop_ratio": "ratio", "flip_p": "flip_p",
                            "rotate_degrees": "degrees", "fill": "fill"}
DOWNSTREAM_OFF = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip_p": 0.0,
                  "rotate_degrees": 0.0, "fill": "zero"}


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(value: Any, key: str, lo: float, hi: float) -> tuple[float, float]:
  """A (lo, hi) pair of numbers within [lo, hi] (a bare number v means (v, v))."""
  value = (value, value) if _number(value) else _tuples(value)
  if not (isinstance(value, tuple) and len(value) == 2 and all(map(_number, value))
          and lo <= value[0] <= value[1] <= hi and value[0] > 0):
    raise ConfigError(f"{key}={value!r} must be a number or a range (lo, hi) with "
                      f"0 < lo <= hi{f' <= {hi:g}' if hi < math.inf else ''}")
  return float(value[0]), float(value[1])


def downstream_kwargs(config: Any, prefix: str = "augment") -> dict[str, Any] | None:
  """`downstream_augment`'s keyword arguments from an `augment` config block, or None
  when the block is absent or every part is the identity (no augmentation at all).

  Fields (CAMContrast Table 2): crop_scale (area fraction range, (0, 1]), crop_ratio
  (aspect range), flip_p (horizontal flip probability), rotate_degrees (rotation in
  [-d, d]; Table 2's 30 or 90), fill ("zero" or "edge" corners).

  Raises:
    ConfigError: an unknown field or a bad value; the message names the key (e.g.
      "augment.flip_p").
  """
  if config is None:
    return None
  block = dict(config)
  key = lambda field: f"{prefix}.{field}"
  unknown = sorted(set(block) - set(DOWNSTREAM_CONFIG_FIELDS))
  if unknown:
    raise ConfigError(f"{', '.join(key(f) for f in unknown)}: not a field of the downstream "
                      f"augmentation; expected {sorted(DOWNSTREAM_CONFIG_FIELDS)}")
  values = {**DOWNSTREAM_OFF, **block}
  scale = _range(values["crop_scale"], key("crop_scale"), 0.0, 1.0)
  ratio = _range(values["crop_ratio"], key("crop_ratio"), 0.0, math.inf)
  flip_p, degrees = values["flip_p"], values["rotate_degrees"]
  if not (_number(flip_p) and 0.0 <= flip_p <= 1.0):
    raise ConfigError(f"{key('flip_p')}={flip_p!r} must be a probability in [0, 1]")
  if not (_number(degrees) and 0.0 <= degrees <= 180.0):
    raise ConfigError(f"{key('rotate_degrees')}={degrees!r} must be a number of degrees in "
                      f"[0, 180] (rotations are drawn from [-d, d])")
  if values["fill"] not in ("zero", "edge"):
    raise ConfigError(f"{key('fill')}={values['fill']!r} must be 'zero' or 'edge'")
  if (scale, ratio, flip_p, degrees) == ((1.0, 1.0), (1.0, 1.0), 0.0, 0.0):
    return None
  return dict(scale=scale, ratio=ratio, flip_p=float(flip_p), degrees=float(degrees),
              fill=str(values["fill"]))


def _as_float(images: Array, ranks: tuple[int, ...] = (4,)) -> Array:
  """The batch as float32 in [0, 1] (uint8 scaled by 1/255); `ranks` are the accepted
  batch ranks: 4 for images (B, H, W, C), 5 for volumes (B, D, H, W, C)."""
  images = jnp.asarray(images)
  if images.ndim not in ranks or images.shape[-1] not in (1, 3):
    kinds = " or ".join(_BATCH_KINDS[r] for r in ranks)
    raise ValueError(f"expected a batch of {kinds} with C in {{1, 3}}, "
                     f"got shape {images.shape}")
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _policy_input(fn: Policy, images: Array) -> Array:
  """`images` as a float32 batch of images or volumes that the policy `fn` takes.

  Raises:
    ValueError: not a batch of images or volumes, or (for a registered policy) the
      other kind than the policy takes; the message names the policy and the shape.
  """
  images = _as_float(images, (4, 5))
  ranks = next((r for f, r in _POLICY_RANKS.items() if f is fn), (4, 5))  # fn may not hash.
  if images.ndim not in ranks:
    name = next((k for k, v in POLICIES.items() if v is fn), getattr(fn, "__name__", fn))
    kinds = " or ".join(_BATCH_KINDS[r] for r in ranks)
    hint = _OTHER_KIND_HINT[ranks[0]] if len(ranks) == 1 else ""
    raise ValueError(f"augmentation policy {name!r} takes a batch of {kinds}, "
                     f"got shape {images.shape}{hint}")
  return images


def augment_batch(fn: str | Policy, rng: Array, images: Array, *,
                  indices: Array | None = None, **kwargs: Any) -> Array:
  """Applies a single-image (or single-volume) policy to every example with its own key.

  Example i gets the key fold_in(rng, indices[i]) (indices default to
  0..B-1), so its result does not depend on the batch size or on how the batch
  is sharded. Pass dataset indices as `indices` to make the augmentation a
  function of (rng, example) only.

  Args:
    fn: a policy name or a callable fn(rng, x, **kwargs) on one (H, W, C) image or
      one (D, H, W, C) volume.
    rng: PRNG key.
    images: (B, H, W, C) images or (B, D, H, W, C) volumes; uint8 is scaled by 1/255,
      floats must be in [0, 1].
    indices: optional (B,) integer example ids used to derive the keys.
    **kwargs: passed to `fn` (e.g. out_size=..., num_ops=...).

  Returns:
    (B, out_h, out_w, C) or (B, out_d, out_h, out_w, C) float32 augmented examples.

  Raises:
    ValueError: `images` is neither kind, or a registered policy gets the other kind
      (a 2-D policy volumes, "standard3d" images); the message names the policy.
  """
  fn = get_policy(fn)
  images = _policy_input(fn, images)
  keys = _example_keys(rng, images.shape[0], indices)
  return jax.vmap(lambda k, x: fn(k, x, **kwargs))(keys, images)


def _example_keys(rng: Array, batch: int, indices: Array | None) -> Array:
  """fold_in(rng, indices[i]) per example (indices default to 0..B-1)."""
  if indices is None:
    indices = jnp.arange(batch, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, indices)


def augment_labelled_batch(rng: Array, images: Array, labels: dict[str, Array], *,
                           label_classes: dict[str, int], indices: Array | None = None,
                           **kwargs: Any) -> tuple[Array, dict[str, Array]]:
  """`downstream_augment` on every example, its label maps (B, H, W) moving with it.

  Example i gets the key fold_in(rng, indices[i]), as in `augment_batch`.

  Returns:
    ((B, H, W, C) float32 images, {key: (B, H, W) label maps}).
  """
  images = _as_float(images)
  keys = _example_keys(rng, images.shape[0], indices)
  fn = functools.partial(downstream_augment, label_classes=label_classes, **kwargs)
  return jax.vmap(fn)(keys, images, labels)


def make_views(rng: Array, images: Array, policy: str | Policy = "strong", num_views: int = 2,
               *, indices: Array | None = None, **kwargs: Any) -> Array:
  """Independently augmented views of a batch, e.g. DCL-CsTP's v1, v2, v3.

  View v uses the key fold_in(rng, v), then `augment_batch`. The views are
  computed by one `vmap` (one copy of the policy in the compiled program).

  Args:
    rng: PRNG key.
    images: (B, H, W, C) images or (B, D, H, W, C) volumes.
    policy: "strong", "simclr", "standard", "standard3d" (volumes), "none", or a
      callable policy.
    num_views: number of views V.
    indices: optional (B,) example ids (see `augment_batch`).
    **kwargs: passed to the policy (e.g. out_size=..., num_ops=...).

  Returns:
    (V, B, out_h, out_w, C) float32 views ((V, B, out_d, out_h, out_w, C) for volumes);
    `v1, v2, v3 = make_views(...)` unpacks them.
  """
  fn = get_policy(policy)
  images = _policy_input(fn, images)  # Fails here, not inside the vmap over views.
  view_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      rng, jnp.arange(num_views, dtype=jnp.uint32))
  return jax.vmap(lambda k: augment_batch(fn, k, images, indices=indices, **kwargs))(view_keys)
