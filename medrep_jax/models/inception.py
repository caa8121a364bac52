"""InceptionV3, FID variant (Szegedy et al., 2016; Heusel et al., 2017), in flax.linen.

This is the network behind the Frechet Inception Distance: the 2015-12-05 TensorFlow
Inception graph, in the layout used by the common PyTorch FID port. It differs from
the ImageNet InceptionV3 of torchvision in four places, all in the pooling branches:

* Mixed_5b/5c/5d (block A), Mixed_6b..6e (block C) and Mixed_7b (first block E)
  average-pool with ``count_include_pad=False`` (the TF graph's SAME average pool);
* Mixed_7c (last block E) max-pools in its pool branch.

There are no auxiliary logits, and the 1008-way classifier is dropped: the module
returns the 2048-d "pool3" feature (global average of Mixed_7c). Inputs are NHWC
images already scaled to [-1, 1]; the FID convention is 299x299 (see
`medrep_jax.eval.inception_weights.InceptionFeatures`, which resizes and scales).

Module names mirror the PyTorch state-dict keys, so ``Mixed_5b.branch1x1.conv.weight``
is ``params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]`` (transposed OIHW -> HWIO) and
``Mixed_5b.branch1x1.bn.running_mean`` is ``batch_stats[...]["bn"]["mean"]``.
Without the classifier the network has 21,785,568 parameters (plus 34,432 BN running stats).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Pad = int | tuple[int, int]
PrecisionLike = Any

BN_EPS = 1e-3


def _pairs(p: Pad) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric (ph, pw) padding as flax's ((top, bottom), (left, right))."""
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
  """3x3 stride-1 average pool that ignores the zero padding (TF SAME)."""
  return nn.avg_pool(x, (3, 3), (1, 1), _pairs(1), count_include_pad=False)


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU."""
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: Pad = 0
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
    x = nn.Conv(self.features, k, (self.stride, self.stride), _pairs(self.padding),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


class _Block(nn.Module):
  """Base for the mixed blocks: a `conv` helper naming each BasicConv2d."""
  precision: PrecisionLike = None

  def conv(self, x: jnp.ndarray, name: str, features: int, kernel: int | tuple[int, int],
           stride: int = 1, padding: Pad = 0) -> jnp.ndarray:
    return BasicConv2d(features, kernel, stride, padding, self.precision, name=name)(x)


class InceptionA(_Block):
  """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and avg-pool branches."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b1 = self.conv(x, "branch1x1", 64, 1)
    b5 = self.conv(x, "branch5x5_1", 48, 1)
    b5 = self.conv(b5, "branch5x5_2", 64, 5, padding=2)
    b3 = self.conv(x, "branch3x3dbl_1", 64, 1)
    b3 = self.conv(b3, "branch3x3dbl_2", 96, 3, padding=1)
    b3 = self.conv(b3, "branch3x3dbl_3", 96, 3, padding=1)
    bp = self.conv(_avg_pool_3x3(x), "branch_pool", self.pool_features, 1)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Grid reduction 35 -> 17 (Mixed_6a)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = self.conv(x, "branch3x3", 384, 3, stride=2)
    bd = self.conv(x, "branch3x3dbl_1", 64, 1)
    bd = self.conv(bd, "branch3x3dbl_2", 96, 3, padding=1)
    bd = self.conv(bd, "branch3x3dbl_3", 96, 3, stride=2)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorized 7x7 convolutions (Mixed_6b..6e)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c7 = self.channels_7x7
    b1 = self.conv(x, "branch1x1", 192, 1)
    b7 = self.conv(x, "branch7x7_1", c7, 1)
    b7 = self.conv(b7, "branch7x7_2", c7, (1, 7), padding=(0, 3))
    b7 = self.conv(b7, "branch7x7_3", 192, (7, 1), padding=(3, 0))
    bd = self.conv(x, "branch7x7dbl_1", c7, 1)
    bd = self.conv(bd, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
    bd = self.conv(bd, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
    bd = self.conv(bd, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
    bd = self.conv(bd, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
    bp = self.conv(_avg_pool_3x3(x), "branch_pool", 192, 1)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Grid reduction 17 -> 8 (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = self.conv(x, "branch3x3_1", 192, 1)
    b3 = self.conv(b3, "branch3x3_2", 320, 3, stride=2)
    b7 = self.conv(x, "branch7x7x3_1", 192, 1)
    b7 = self.conv(b7, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
    b7 = self.conv(b7, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
    b7 = self.conv(b7, "branch7x7x3_4", 192, 3, stride=2)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block with expanded 1x3/3x1 branches (Mixed_7b, Mixed_7c).

  Attributes:
    pool: "avg" (Mixed_7b, count_include_pad=False) or "max" (Mixed_7c), the FID
      graph's pool branch; both are 3x3, stride 1, padding 1.
  """
  pool: str = "avg"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b1 = self.conv(x, "branch1x1", 320, 1)
    b3 = self.conv(x, "branch3x3_1", 384, 1)
    b3 = jnp.concatenate([self.conv(b3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                          self.conv(b3, "branch3x3_2b", 384, (3, 1), padding=(1, 0))], -1)
    bd = self.conv(x, "branch3x3dbl_1", 448, 1)
    bd = self.conv(bd, "branch3x3dbl_2", 384, 3, padding=1)
    bd = jnp.concatenate([self.conv(bd, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
                          self.conv(bd, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))], -1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), _pairs(1))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    bp = self.conv(pooled, "branch_pool", 192, 1)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """FID InceptionV3 up to pool3: (B, H, W, 3) in [-1, 1] -> (B, 2048).

  BatchNorm always uses its running statistics (this is a frozen feature network),
  so `apply` needs ``{"params", "batch_stats"}`` and no mutable collections. Any
  input of at least 75x75 works; FID uses 299x299.

  Attributes:
    precision: convolution precision (None: JAX default; "highest" keeps float32
      on accelerators that would otherwise use TF32/bf16 passes).
  """
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 75:
      raise ValueError(f"InceptionV3FID expects (B, H>=75, W>=75, 3) NHWC input, "
                       f"got shape {x.shape}")
    p = self.precision
    conv = lambda y, name, *a, **k: BasicConv2d(*a, precision=p, name=name, **k)(y)
    x = conv(x, "Conv2d_1a_3x3", 32, 3, stride=2)
    x = conv(x, "Conv2d_2a_3x3", 32, 3)
    x = conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
    x = _max_pool_3x3_s2(x)
    x = conv(x, "Conv2d_3b_1x1", 80, 1)
    x = conv(x, "Conv2d_4a_3x3", 192, 3)
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(p, pool_features, name=name)(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(p, c7, name=name)(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(p, "avg", name="Mixed_7b")(x)
    x = InceptionE(p, "max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def init_variables(rng: jax.Array, image_size: int = 75,
                   precision: PrecisionLike = None) -> dict[str, Any]:
  """Randomly initialized ``{"params", "batch_stats"}`` (shapes do not depend on size)."""
  model = InceptionV3FID(precision=precision)
  return dict(model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32)))


def variable_shapes(precision: PrecisionLike = None) -> dict[str, Any]:
  """The variable tree as `jax.ShapeDtypeStruct`s, without computing anything."""
  return jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), precision=precision))


def param_count(variables: dict[str, Any], collections: Sequence[str] = ("params",)) -> int:
  """Number of scalars in the given collections (default: trainable params only)."""
  return sum(int(leaf.size) for c in collections
             for leaf in jax.tree_util.tree_leaves(variables[c]))
