"""ResNet-18/34/50 encoders (He et al., 2016) in flax.linen, on images or volumes.

The encoders return a dict of multi-scale features instead of class logits,
so one module serves classification (linear head on ``"pooled"``), U-Net
segmentation (skips from ``"c1"``..``"c5"``) and contrastive pretraining.

The same modules take NDHWC volumes with ``spatial_dims=3`` (registry names
``"<name>_3d"``, e.g. ``"resnet18_3d"``): every k x k kernel, stride and pool
window becomes k x k x k, and ``"pooled"`` averages over D, H and W. That is
the 3D encoder of CAMContrast Sec. 4.7 (see ``ResNet``). 3D convolutions go
through ``conv_grad`` as well, which on CPU gives them a phase-decomposed input
gradient (strided convs) and a per-tap matmul weight gradient.

Layout follows torchvision's ResNet v1.5 (stride on the 3x3 conv of the
bottleneck, symmetric explicit padding), so parameter counts match it:
ResNet-50 has 23,508,032 parameters and ResNet-18 11,176,512 without the fc.

Normalization statistics are always float32: flax computes BatchNorm and
GroupNorm means/variances with float32 reductions whatever the compute dtype,
and ``batch_stats`` are stored as float32. Under ``jax.jit`` with the batch
sharded over a ``Mesh`` via ``NamedSharding``, the batch mean inside
``nn.BatchNorm`` is already the global-batch mean (XLA SPMD inserts the
all-reduce), so no ``axis_name`` is needed; ``axis_name`` only matters inside
``shard_map``/``pmap`` (for example a shuffle-BN implementation).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models import conv_grad

Dtype = Any
Features = dict[str, jnp.ndarray]

NORMS = ("batch", "group", "none")
SPATIAL_DIMS = (2, 3)
_LAYOUTS = {2: "NHWC images", 3: "NDHWC volumes"}
SUFFIX_3D = "_3d"


def split_spatial(name: str) -> tuple[str, int]:
  """A registry name's 2-D base and dimensionality: ("resnet18", 3) for "resnet18_3d"."""
  if name.endswith(SUFFIX_3D):
    return name[:-len(SUFFIX_3D)], 3
  return name, 2


def spatial_name(name: str, kw: dict[str, Any]) -> str:
  """The 2-D base of registry ``name``; a "_3d" name sets ``kw["spatial_dims"] = 3``.

  Raises:
    ValueError: a "_3d" name with ``kw["spatial_dims"]`` other than 3.
  """
  base, dims = split_spatial(name)
  if dims == 3 and kw.setdefault("spatial_dims", 3) != 3:
    raise ValueError(f"{name!r} is a 3-D encoder, got spatial_dims={kw['spatial_dims']}")
  return base


def check_input(x: jnp.ndarray, spatial_dims: int, who: str) -> None:
  """Raises ValueError unless ``x`` is (B, *spatial, C) with ``spatial_dims`` spatial axes."""
  if spatial_dims not in SPATIAL_DIMS:
    raise ValueError(f"{who}: spatial_dims must be one of {SPATIAL_DIMS}, got {spatial_dims}")
  if x.ndim != spatial_dims + 2:
    raise ValueError(f"{who} expects {_LAYOUTS[spatial_dims]}, got shape {x.shape}")


def global_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Global average over the spatial axes of (B, *spatial, C): (B, C)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def window(k: int, x: jnp.ndarray) -> tuple[int, ...]:
  """A k x ... x k kernel, stride or pool window over the spatial axes of ``x``."""
  return (k,) * (x.ndim - 2)


def pads(p: int, x: jnp.ndarray) -> tuple[tuple[int, int], ...]:
  """Symmetric padding ``p`` on every spatial axis of ``x``."""
  return ((p, p),) * (x.ndim - 2)


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest number of groups <= ``max_groups`` that divides ``channels``."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def make_norm(kind: str, x: jnp.ndarray, train: bool, *, name: str,
              dtype: Dtype = jnp.float32, zero_init: bool = False) -> jnp.ndarray:
  """Applies a named normalization layer inside the caller's compact scope.

  Args:
    kind: "batch" (BatchNorm, momentum 0.9, eps 1e-5), "group" (GroupNorm with
      ``group_count(C)`` groups) or "none" (identity).
    x: NHWC (or NDHWC) input.
    train: BatchNorm uses batch statistics and updates ``batch_stats`` when
      True, running averages otherwise.
    name: submodule name.
    dtype: output dtype; statistics are computed in float32 regardless.
    zero_init: initialize the scale to zero (last norm of a residual branch).

  Returns:
    The normalized array in ``dtype``.
  """
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                        scale_init=scale_init, name=name)(x)
  if kind == "group":
    return nn.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=1e-5,
                        dtype=dtype, param_dtype=jnp.float32,
                        scale_init=scale_init, name=name)(x)
  if kind == "none":
    return x.astype(dtype)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _conv(dtype: Dtype) -> Callable[..., nn.Conv]:
  return functools.partial(
      nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
      conv_general_dilated=conv_grad.conv_general_dilated,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


_PAD3 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity or 1x1 projection shortcut (3x3x3, 1x1x1 on volumes)."""
  filters: int
  strides: int = 1
  norm: str = "batch"
  zero_init_last: bool = True
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = _conv(self.dtype)
    k3, s, p1 = window(3, x), window(self.strides, x), pads(1, x)
    y = conv(self.filters, k3, s, padding=p1, name="conv1")(x)
    y = nn.relu(make_norm(self.norm, y, train, name="norm1", dtype=self.dtype))
    y = conv(self.filters, k3, padding=p1, name="conv2")(y)
    y = make_norm(self.norm, y, train, name="norm2", dtype=self.dtype,
                  zero_init=self.zero_init_last)
    return nn.relu(y + _shortcut(self, x, train))


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, plus shortcut (any rank)."""
  filters: int
  strides: int = 1
  norm: str = "batch"
  zero_init_last: bool = True
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = _conv(self.dtype)
    k1, s = window(1, x), window(self.strides, x)
    y = conv(self.filters, k1, name="conv1")(x)
    y = nn.relu(make_norm(self.norm, y, train, name="norm1", dtype=self.dtype))
    y = conv(self.filters, window(3, x), s, padding=pads(1, x), name="conv2")(y)
    y = nn.relu(make_norm(self.norm, y, train, name="norm2", dtype=self.dtype))
    y = conv(self.filters * 4, k1, name="conv3")(y)
    y = make_norm(self.norm, y, train, name="norm3", dtype=self.dtype,
                  zero_init=self.zero_init_last)
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block: nn.Module, x: jnp.ndarray, train: bool) -> jnp.ndarray:
  """Identity, or 1x1 strided conv + norm when the shape changes."""
  out = block.filters * block.expansion
  if block.strides == 1 and x.shape[-1] == out:
    return x
  r = _conv(block.dtype)(out, window(1, x), window(block.strides, x), name="proj_conv")(x)
  return make_norm(block.norm, r, train, name="proj_norm", dtype=block.dtype)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
  """ResNet encoder returning multi-scale features, of images (2-D) or volumes (3-D).

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: "basic" or "bottleneck".
    num_filters: width of the first stage (64 in the paper); stage i has
      ``num_filters * 2**i`` (times 4 for bottleneck outputs).
    norm: "batch", "group" or "none".
    small_input: 3x3 stride-1 stem without max-pool, for 28-64 px images.
    zero_init_residual: zero-init the last norm scale of every residual branch
      (Goyal et al., 2017), so each block starts as the identity.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are float32.
    remat: recompute each residual block's activations in the backward pass
      (``nn.remat``) instead of storing them: less memory, about one more
      forward pass of compute. Parameters and results are unchanged.
    spatial_dims: 2 (NHWC images) or 3 (NDHWC volumes; the ``"<name>_3d"``
      registry names). In 3-D every kernel, stride and pool window is cubic
      (7x7x7 stride-2 stem, 3x3x3 convs, 3x3x3 stride-2 max-pool).

  ``__call__(x, train)`` takes NHWC images (NDHWC volumes) and returns a dict
  with ``"c1"`` (stem output before max-pool: stride 2, or 1 with
  ``small_input``), ``"c2"``..``"c5"`` (stage outputs; strides 4, 8, 16, 32
  with the ImageNet stem, 1, 2, 4, 8 with the small stem, on every spatial
  axis) and ``"pooled"`` (global average of the last stage over all spatial
  axes, shape (B, feature_dim)). Features are in ``dtype``.

  The 3-D encoder of CAMContrast Sec. 4.7 (ADNI T1 volumes, 80x96x80) is "a
  variant of ResNet encoder introduced by Yang et al. [74] which adapts the
  architecture to handle 3D volumetric inputs and to produce 3D CAMs"; the
  paper gives no layer list. Our reading: this ResNet-18 layout with
  ``spatial_dims=3`` (``"resnet18_3d"``), a GAP over D, H, W and the linear head
  of ``unet.Classifier``, so the CAM of eq. 1 lives on the c5 grid; the width
  (``num_filters``, the config's ``model.width``) is a knob. Yang et al. note
  that such CAMs are limited by the resolution of the last conv layer: the
  ImageNet stem leaves c5 at stride 32 (3x3x3 for 80x96x80), ``small_input``
  at stride 8 (10x12x10, which the paper's 40x48x40 sub-volumes halve into
  5x6x5 heatmap crops) at the cost of full-resolution first-stage activations.
  """
  stage_sizes: Sequence[int]
  block: str = "basic"
  num_filters: int = 64
  norm: str = "batch"
  small_input: bool = False
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False
  spatial_dims: int = 2

  @property
  def feature_dim(self) -> int:
    """Width of ``"pooled"`` (and of the last stage)."""
    expansion = BLOCKS[self.block].expansion
    return self.num_filters * 2 ** (len(self.stage_sizes) - 1) * expansion

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> Features:
    if self.block not in BLOCKS:
      raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
    check_input(x, self.spatial_dims, "ResNet")
    x = x.astype(self.dtype)
    conv = _conv(self.dtype)
    if self.small_input:
      x = conv(self.num_filters, window(3, x), padding=pads(1, x), name="stem_conv")(x)
    else:
      x = conv(self.num_filters, window(7, x), window(2, x), padding=pads(3, x),
               name="stem_conv")(x)
    x = nn.relu(make_norm(self.norm, x, train, name="stem_norm", dtype=self.dtype))
    feats = {"c1": x}
    if not self.small_input:
      x = nn.max_pool(x, window(3, x), strides=window(2, x), padding=pads(1, x))
    block_cls = BLOCKS[self.block]
    if self.remat:  # `train` (argument 2, counting self) selects Python control flow.
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        x = block_cls(
            filters=self.num_filters * 2 ** i,
            strides=2 if (i > 0 and j == 0) else 1,
            norm=self.norm, zero_init_last=self.zero_init_residual,
            dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      feats[f"c{i + 2}"] = x
    feats["pooled"] = global_pool(x)
    return feats


_SPECS: dict[str, tuple[tuple[int, ...], str, int]] = {
    "resnet_tiny": ((1, 1, 1, 1), "basic", 16),
    "resnet18": ((2, 2, 2, 2), "basic", 64),
    "resnet34": ((3, 4, 6, 3), "basic", 64),
    "resnet50": ((3, 4, 6, 3), "bottleneck", 64),
}
RESNET_NAMES = tuple(_SPECS)
# The same layouts on NDHWC volumes (CAMContrast Sec. 4.7): ResNet(spatial_dims=3).
RESNET_3D_NAMES = tuple(name + SUFFIX_3D for name in _SPECS)


def get_resnet(name: str, /, **kw: Any) -> ResNet:
  """Builds a named ResNet; ``kw`` overrides ResNet attributes (e.g. norm).

  A ``"<name>_3d"`` name (``RESNET_3D_NAMES``) is the same layout with
  ``spatial_dims=3``.

  Raises:
    ValueError: unknown ``name`` (the message lists the valid names), or a 3-D
      name with ``spatial_dims`` other than 3.
  """
  base = spatial_name(name, kw)
  if base not in _SPECS:
    raise ValueError(f"unknown ResNet {name!r}; valid names: "
                     f"{list(RESNET_NAMES + RESNET_3D_NAMES)}")
  stages, block, width = _SPECS[base]
  kw.setdefault("num_filters", width)
  return ResNet(stage_sizes=stages, block=block, **kw)


def resnet18(**kw: Any) -> ResNet:
  return get_resnet("resnet18", **kw)


def resnet34(**kw: Any) -> ResNet:
  return get_resnet("resnet34", **kw)


def resnet50(**kw: Any) -> ResNet:
  return get_resnet("resnet50", **kw)


def resnet_tiny(**kw: Any) -> ResNet:
  """ResNet-10 layout (one basic block per stage), 16 filters: for CPU tests."""
  return get_resnet("resnet_tiny", **kw)


def feature_dim(name: str, /, **kw: Any) -> int:
  """Pooled feature width of the named ResNet (2048 for resnet50)."""
  return get_resnet(name, **kw).feature_dim
