"""LPIPS-VGG (Zhang et al., 2018) from a user-supplied weight file.

LPIPS ("The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") compares
two images through a frozen VGG-16: at each of the five layers relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3 the features are unit-normalized along channels, their squared
difference is weighted per channel by a learned non-negative vector w_l (the "lin"
layers, 1x1 convolutions without bias), averaged over space, and the five layer terms
are summed:

  d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (x^_{l,hwc} - y^_{l,hwc})^2,
  x^_l = f_l / (||f_l||_channels + 1e-10).

Inputs in [-1, 1] first go through LPIPS's fixed scaling layer, (x - shift) / scale with
shift (-.030, -.088, -.188) and scale (.458, .448, .450) (the ImageNet mean/std in
[-1, 1] units); grey images are repeated to three channels. With all lin weights equal to
one this is the paper's uncalibrated "baseline" VGG distance.

No weights can be downloaded by this library. Users who have them load an ``.npz`` with
`load_lpips`; it holds float32 arrays under these keys (the flax parameter paths):

  vgg/conv{b}_{i}/kernel   (3, 3, C_in, C_out), HWIO   b = 1..5, i = 1..2 (b <= 2) or 1..3
  vgg/conv{b}_{i}/bias     (C_out,)
  lin/relu{b}_{n}          (C,), non-negative          relu1_2, relu2_2, relu3_3, relu4_3,
                                                        relu5_3 with C = 64, 128, 256, 512, 512

(13 conv layers of widths 64,64 | 128,128 | 256x3 | 512x3 | 512x3: 14,714,688 VGG and
1,472 lin parameters.) `save_lpips_npz` writes such a file from parameters in memory.

Converting the official weights (needs torch once, not this library): the trunk is
torchvision's ImageNet VGG-16 (``vgg16(weights="IMAGENET1K_V1")``), whose
``features.{idx}.weight`` (OIHW) and ``.bias`` are conv{b}_{i} for idx = 0, 2 | 5, 7 |
10, 12, 14 | 17, 19, 21 | 24, 26, 28, with kernels transposed OIHW -> HWIO; the LPIPS
weights (``lpips/weights/v0.1/vgg.pth`` of the LPIPS repository) hold
``lin{k}.model.1.weight`` of shape (1, C, 1, 1), k = 0..4 for relu1_2 .. relu5_3.
A saved full LPIPS module names the trunk ``net.slice{s}.{idx}.*`` with the same idx, and
the lin layers also ``lins.{k}.model.1.weight``. `params_from_torch` does this mapping on a
dict of arrays (torch CPU tensors work too):

  import torch, torchvision
  from medrep_jax.eval import lpips
  state = {**torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(),
           **torch.load("vgg.pth", map_location="cpu")}
  lpips.save_lpips_npz(lpips.params_from_torch(state, source="vgg.pth"), "lpips_vgg.npz")

then ``lpips.load_lpips("lpips_vgg.npz")`` anywhere, without torch.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax import traverse_util

from medrep_jax.eval import feature_nets, weight_files

NET_NAME = "lpips-vgg"
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LAYERS = tuple(f"relu{b}_{len(w)}" for b, w in enumerate(VGG_BLOCKS, 1))
LAYER_CHANNELS = tuple(w[-1] for w in VGG_BLOCKS)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
MIN_SIZE = 2 ** (len(VGG_BLOCKS) - 1)  # four 2x2 max-pools before relu5_3
_RANGE_TOL = 1e-3


def _torch_conv_index() -> dict[int, tuple[int, int]]:
  """torchvision ``features`` index -> (block, conv) of VGG-16: conv, ReLU pairs, then a pool."""
  table, idx = {}, 0
  for b, widths in enumerate(VGG_BLOCKS, 1):
    for i in range(1, len(widths) + 1):
      table[idx] = (b, i)
      idx += 2
    idx += 1
  return table


TORCH_CONV_INDEX = _torch_conv_index()


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """The npz key -> shape table of an LPIPS-VGG weight file (see the module docstring)."""
  table, c_in = {}, 3
  for b, widths in enumerate(VGG_BLOCKS, 1):
    for i, c_out in enumerate(widths, 1):
      table[f"vgg/conv{b}_{i}/kernel"] = (3, 3, c_in, c_out)
      table[f"vgg/conv{b}_{i}/bias"] = (c_out,)
      c_in = c_out
  for layer, c in zip(LAYERS, LAYER_CHANNELS):
    table[f"lin/{layer}"] = (c,)
  return table


# ------------------------------------------------------------------------------ network


def scale_input(x: jax.Array) -> jax.Array:
  """LPIPS's scaling layer: (N, H, W, 1|3) in [-1, 1] -> (x - shift) / scale, RGB.

  Args:
    x: images in [-1, 1]; one channel is repeated to three.

  Returns:
    (N, H, W, 3) VGG input.
  """
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


def normalize_channels(f: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """Unit-normalizes features along the last (channel) axis: f / (||f|| + eps).

  The forward value is exactly LPIPS's; the square root is guarded so that an all-zero
  feature vector (dead ReLUs) has a finite gradient.

  Args:
    f: (..., C) features.
    eps: added to the norm.

  Returns:
    Features of the same shape with channel norm 1 (or 0 where f is 0).
  """
  ss = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  pos = ss > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)
  return f / (norm + eps)


class VGG16Trunk(nn.Module):
  """The convolutional part of VGG-16 up to relu5_3; returns the five LPIPS taps.

  Attributes:
    precision: convolution precision; "highest" keeps float32 on GPU/TPU.
  """
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Maps (N, H, W, 3) scaled images to (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""
    taps = []
    for b, widths in enumerate(VGG_BLOCKS, 1):
      if b > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, width in enumerate(widths, 1):
        x = nn.relu(nn.Conv(width, (3, 3), padding=1, precision=self.precision,
                            name=f"conv{b}_{i}")(x))
      taps.append(x)
    return tuple(taps)


class LinLayers(nn.Module):
  """The per-channel weights w_l of LPIPS: params ``relu1_2`` .. ``relu5_3``, each (C,).

  Initialized to ones (the uncalibrated baseline); trained LPIPS weights are >= 0.
  """

  def setup(self):
    self.weights = [self.param(layer, nn.initializers.ones, (c,))
                    for layer, c in zip(LAYERS, LAYER_CHANNELS)]

  def __call__(self, sq_diffs: Sequence[jax.Array]) -> jax.Array:
    """Sums over layers the spatial mean of the w-weighted channel sum: (..., H, W, C)s -> (...)."""
    return sum(jnp.mean(jnp.sum(d * w, axis=-1), axis=(-2, -1))
               for d, w in zip(sq_diffs, self.weights))


class LPIPS(nn.Module):
  """LPIPS-VGG on images in [-1, 1]: ``apply({"params": p}, x, y)`` -> (N,) distances.

  Parameters: ``vgg`` (a `VGG16Trunk`) and ``lin`` (`LinLayers`), i.e. the npz keys of the
  module docstring. `features` and `compare` split the computation so that one image's
  features can be compared with many (see `diversity_lpips`).

  Attributes:
    precision: convolution precision of the VGG trunk.
  """
  precision: Any = "highest"

  def setup(self):
    self.vgg = VGG16Trunk(precision=self.precision)
    self.lin = LinLayers()

  def raw_features(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """The five VGG ReLU outputs of (N, H, W, 1|3) images in [-1, 1], unnormalized."""
    return self.vgg(scale_input(x))

  def features(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """The five channel-normalized VGG ReLU outputs of (N, H, W, 1|3) images in [-1, 1]."""
    return tuple(normalize_channels(f) for f in self.raw_features(x))

  def compare(self, fx: Sequence[jax.Array], fy: Sequence[jax.Array]) -> jax.Array:
    """LPIPS between normalized features (broadcasting over leading axes): -> (...)."""
    return self.lin([jnp.square(a - b) for a, b in zip(fx, fy)])

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """(N,) distances between (N, H, W, 1|3) images x and y in [-1, 1]."""
    n = x.shape[0]
    feats = self.features(jnp.concatenate([x, y]))  # one trunk pass for both
    return self.compare([f[:n] for f in feats], [f[n:] for f in feats])


# ------------------------------------------------------------------------------ weights


def _flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """{"vgg": ..., "lin": ...} or {"params": {...}} -> {"vgg/conv1_1/kernel": array, ...}."""
  if "params" in params and "vgg" not in params:
    params = params["params"]
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}


def validate_params(flat: Mapping[str, Any], *, source: str = "parameters",
                    strict: bool = True) -> dict[str, Any]:
  """Checks npz-keyed LPIPS-VGG weights and returns the flax ``params`` tree.

  Args:
    flat: npz key (``vgg/conv1_1/kernel``, ``lin/relu1_2``, ...) -> array.
    source: what to call the weights in error messages (usually the file name).
    strict: also reject keys that are not in `expected_shapes`.

  Returns:
    ``{"vgg": {...}, "lin": {...}}`` of float32 numpy arrays, for `LPIPS.apply`.

  Raises:
    ValueError: naming the source and the missing keys (with their expected shapes),
      the misshapen keys, the (strict) unexpected keys, non-finite arrays, or lin
      weights with negative entries.
  """
  expected = expected_shapes()
  problems = weight_files.key_problems(flat, expected, strict=strict)
  if not problems:
    arrays = {k: np.asarray(flat[k], np.float32) for k in expected}
    bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if bad:
      problems.append(f"non-finite values in {weight_files.fmt_keys(bad)}")
    negative = [f"{k} (min {arrays[k].min():.4g})" for k in expected
                if k.startswith("lin/") and (arrays[k] < 0).any()]
    if negative:
      problems.append(f"negative lin weight(s) in {weight_files.fmt_keys(negative)} "
                      "(LPIPS lin weights are non-negative)")
  if problems:
    raise ValueError(f"{source} is not an LPIPS-VGG weight file: " + "; ".join(problems))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})


def params_from_torch(state: Mapping[str, Any], *, source: str = "state dict"
                      ) -> dict[str, Any]:
  """Maps PyTorch state-dict names of the official weights to LPIPS-VGG params.

  Recognized: torchvision's ``features.{idx}.weight|bias`` and LPIPS's
  ``net.slice{s}.{idx}.weight|bias`` (any prefix), with OIHW kernels transposed to
  HWIO; ``lin{k}.model.1.weight`` and ``lins.{k}.model.1.weight`` of shape (1, C, 1, 1).
  Other keys (``classifier.*``, ``scaling_layer.*``) are ignored.

  Args:
    state: torch key -> array (numpy arrays or CPU torch tensors).
    source: what to call the state dict in error messages.

  Returns:
    The validated ``{"vgg": ..., "lin": ...}`` params (see `validate_params`).

  Raises:
    ValueError: for missing or misshapen weights (named by their torch keys) or for
      two keys that map to the same weight with different values.
  """
  conv_re = re.compile(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$")
  lin_re = re.compile(r"(?:^|\.)(?:lin(\d)|lins\.(\d))\.model\.1\.weight$")
  flat, origin, problems = {}, {}, []
  for key, value in state.items():
    if m := conv_re.search(key):
      idx = int(m.group(1))
      if idx not in TORCH_CONV_INDEX:
        continue
      b, i = TORCH_CONV_INDEX[idx]
      target = f"vgg/conv{b}_{i}/{'kernel' if m.group(2) == 'weight' else 'bias'}"
    elif m := lin_re.search(key):
      k = int(m.group(1) or m.group(2))
      if k >= len(LAYERS):
        continue
      target = f"lin/{LAYERS[k]}"
    else:
      continue
    arr = np.asarray(value, np.float32)
    shape = expected_shapes()[target]
    if target.endswith("/kernel"):
      torch_shape = (shape[3], shape[2], shape[0], shape[1])
      if arr.shape != torch_shape:
        problems.append(f"{key}: expected shape {torch_shape}, got {arr.shape}")
        continue
      arr = arr.transpose(2, 3, 1, 0)
    elif target.startswith("lin/"):
      if arr.shape != (1, shape[0], 1, 1):
        problems.append(f"{key}: expected shape {(1, shape[0], 1, 1)}, got {arr.shape}")
        continue
      arr = arr.reshape(shape)
    if target in flat and not np.array_equal(flat[target], arr):
      problems.append(f"{origin[target]} and {key} differ")
    flat.setdefault(target, arr)
    origin.setdefault(target, key)
  if problems:
    raise ValueError(f"{source} is not an LPIPS-VGG state dict: "
                     f"{weight_files.fmt_keys(problems)}")
  inverse = {f"vgg/conv{b}_{i}/": idx for idx, (b, i) in TORCH_CONV_INDEX.items()}
  missing = []
  for target in expected_shapes():
    if target not in flat:
      if target.startswith("lin/"):
        missing.append(f"lin{LAYERS.index(target[4:])}.model.1.weight")
      else:
        prefix, leaf = target.rsplit("/", 1)
        missing.append(f"features.{inverse[prefix + '/']}."
                       f"{'weight' if leaf == 'kernel' else 'bias'}")
  if missing:
    raise ValueError(f"{source} is not an LPIPS-VGG state dict: {len(missing)} missing "
                     f"key(s): {weight_files.fmt_keys(missing)}")
  return validate_params(flat, source=source)


def save_lpips_npz(params: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
  """Writes LPIPS-VGG params as an ``.npz`` under the documented keys (validated first).

  Args:
    params: ``{"vgg": ..., "lin": ...}`` (or flax variables ``{"params": ...}``).
    path: output file; must end in ``.npz``.

  Returns:
    The path written.

  Raises:
    ValueError: for a path not ending in .npz, or params that fail `validate_params`.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() != ".npz":
    raise ValueError(f"save_lpips_npz writes .npz files, got {path}")
  checked = validate_params(_flat_params(params), source="params to save")
  np.savez(path, **_flat_params(checked))
  return path


class LPIPSNet:
  """An `LPIPS` module with its parameters, on device: ``net(x, y)`` -> (N,) distances.

  Attributes:
    module: the `LPIPS` flax module.
    params: its ``{"vgg", "lin"}`` parameters (device arrays).
    label: e.g. "LPIPS-VGG (weights from lpips_vgg.npz)", for metric reports.
    batch_size: image pairs per jitted call (the last batch is padded: one compilation).
  """

  def __init__(self, params: Mapping[str, Any], *, label: str = "LPIPS-VGG",
               batch_size: int = 16, precision: Any = "highest",
               source: str = "parameters"):
    """Validates the parameters (see `validate_params`) and puts them on device.

    Args:
      params: ``{"vgg": ..., "lin": ...}`` or ``{"params": ...}``.
      label: the name reported with distances.
      batch_size: image pairs (or, in `diversity_lpips`, images) per jitted call.
      precision: convolution precision.
      source: what to call the parameters in error messages.

    Raises:
      ValueError: for invalid parameters or batch_size < 1.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.module = LPIPS(precision=precision)
    self.params = jax.device_put(validate_params(_flat_params(params), source=source))
    self.label, self.batch_size = label, batch_size

  def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Same as `lpips_distance(self, x, y)`."""
    return lpips_distance(self, x, y)


def load_lpips(path: str | os.PathLike, *, batch_size: int = 16, precision: Any = "highest",
               strict: bool = True) -> LPIPSNet:
  """Loads LPIPS-VGG weights from an ``.npz`` (keys in the module docstring).

  Args:
    path: the weight file.
    batch_size: image pairs per jitted call of the returned net.
    precision: convolution precision.
    strict: reject keys that are not LPIPS-VGG weights.

  Returns:
    An `LPIPSNet` labelled with the file name.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: for a non-.npz file, or missing, misshapen, unexpected, non-finite or
      negative-lin weights (the message names the file and the keys).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS weight file not found: {path}")
  if path.suffix.lower() != ".npz":
    raise ValueError(f"{path}: unsupported LPIPS weight file type {path.suffix!r}; expected "
                     ".npz (convert PyTorch weights with params_from_torch + save_lpips_npz, "
                     "see medrep_jax/eval/lpips.py)")
  with np.load(path, allow_pickle=False) as data:
    flat = {k: np.asarray(data[k]) for k in data.files}
  params = validate_params(flat, source=str(path), strict=strict)
  return LPIPSNet(params, label=f"LPIPS-VGG (weights from {path.name})",
                  batch_size=batch_size, precision=precision, source=str(path))


# ------------------------------------------------------------------------------ metrics


def _check_images(images: np.ndarray, name: str, ndim: int) -> np.ndarray:
  """Validates float images in [0, 1] with C in {1, 3} and H, W >= MIN_SIZE."""
  images = np.asarray(images)
  if images.ndim != ndim or images.shape[-1] not in (1, 3):
    raise ValueError(f"{name} must have {ndim} axes ending in C in {{1, 3}}, got "
                     f"{images.shape}")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{name} must be float in [0, 1], got dtype {images.dtype} "
                     "(divide integer images by their maximum, e.g. 255)")
  if min(images.shape[-3:-1]) < MIN_SIZE:
    raise ValueError(f"{name}: LPIPS-VGG needs images of at least {MIN_SIZE}x{MIN_SIZE} "
                     f"(four 2x2 pools), got {images.shape[-3:-1]}")
  if images.size:
    lo, hi = float(images.min()), float(images.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
      raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
  return np.clip(images, 0.0, 1.0).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _distance01(module: LPIPS, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return module.apply({"params": params}, x * 2.0 - 1.0, y * 2.0 - 1.0)


def lpips_distance(net: LPIPSNet, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """LPIPS between paired images: x, y (N, H, W, C) float in [0, 1], C in {1, 3}.

  The images are mapped to [-1, 1] and compared in jitted batches of `net.batch_size`
  pairs (the last one padded, so one compilation per image shape).

  Args:
    net: an `LPIPSNet` (e.g. from `load_lpips`).
    x: first images.
    y: second images, same shape.

  Returns:
    (N,) float64 distances (computed in float32); 0 for identical images.

  Raises:
    ValueError: for shapes that differ or are not (N, H, W, 1|3) with H, W >= 16,
      non-float images, or values outside [0, 1].
  """
  x, y = _check_images(x, "x", 4), _check_images(y, "y", 4)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  n = len(x)
  if n == 0:
    return np.zeros((0,), np.float64)
  bs = min(net.batch_size, n)
  out = []
  for start in range(0, n, bs):
    cx, cy = x[start:start + bs], y[start:start + bs]
    pad = bs - len(cx)
    if pad:
      cx = np.concatenate([cx, np.repeat(cx[-1:], pad, 0)])
      cy = np.concatenate([cy, np.repeat(cy[-1:], pad, 0)])
    d = _distance01(net.module, net.params, jnp.asarray(cx), jnp.asarray(cy))
    out.append(np.asarray(d)[:bs - pad])
  return np.concatenate(out).astype(np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _mean_pairwise(module: LPIPS, params: Any, group: jax.Array) -> jax.Array:
  """(B, K, H, W, C) in [0, 1] -> (B,) mean LPIPS over the K(K-1) ordered pairs."""
  b, k = group.shape[:2]
  flat = group.reshape(b * k, *group.shape[2:]) * 2.0 - 1.0
  feats = module.apply({"params": params}, flat, method=LPIPS.features)
  feats = [f.reshape(b, k, *f.shape[1:]) for f in feats]

  def row(i):  # (B, K): sample i of each mask against all K samples of that mask
    fi = [jax.lax.dynamic_index_in_dim(f, i, axis=1, keepdims=True) for f in feats]
    return module.apply({"params": params}, fi, feats, method=LPIPS.compare)

  rows = jax.lax.map(row, jnp.arange(k))  # (K, B, K); the diagonal is exactly 0
  return rows.sum(axis=(0, 2)) / (k * (k - 1))


def diversity_lpips(net: LPIPSNet, samples: np.ndarray, *, per_mask: bool = False
                    ) -> float | np.ndarray:
  """LPIPS diversity: mean pairwise LPIPS among the K samples of each mask, over masks.

  The paper's diversity measure (DSDM, Sec. V-A3): for each of M masks, the average of
  LPIPS(s_i, s_j) over the K(K-1)/2 unordered pairs of its samples (LPIPS is symmetric,
  so this equals the mean over ordered pairs i != j); then the mean over masks. Each
  sample's VGG features are computed once, in jitted calls of about `net.batch_size`
  images (whole masks; the last call padded with copies of the last mask).

  Args:
    net: an `LPIPSNet`.
    samples: (M, K, H, W, C) float in [0, 1], K >= 2, C in {1, 3}.
    per_mask: return the (M,) per-mask values instead of their mean.

  Returns:
    The mean over masks (float), or (M,) float64 values with per_mask.

  Raises:
    ValueError: for K < 2, M = 0 or invalid images (see `lpips_distance`).
  """
  samples = _check_images(samples, "samples", 5)
  m, k = samples.shape[:2]
  if m == 0 or k < 2:
    raise ValueError(f"diversity_lpips needs (masks >= 1, K >= 2, H, W, C) samples, got "
                     f"{samples.shape}")
  group = min(m, max(1, net.batch_size // k))
  values = feature_nets.batched(lambda c: _mean_pairwise(net.module, net.params, c),
                                samples, group)
  return values if per_mask else float(values.mean())
