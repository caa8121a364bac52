"""DenseNet-121 encoder (Huang et al., "Densely Connected Convolutional Networks",
CVPR 2017) in flax.linen, beside the ResNets and the U-Net encoder (CAMContrast
Table 12; DCL-CsTP Table 1's supervised rows).

DenseNet-121 (the paper's Table 1, DenseNet-BC with growth rate k = 32):

* stem: 7x7 stride-2 conv with 64 filters, norm, ReLU, 3x3 stride-2 max-pool
  (with ``small_input``: a 3x3 stride-1 conv and no pool, like the ResNets);
* four dense blocks of (6, 12, 24, 16) bottleneck layers, each
  norm-ReLU-1x1 conv (4k filters)-norm-ReLU-3x3 conv (k filters), its k new
  channels concatenated to the block's running input;
* a transition between consecutive blocks: norm-ReLU-1x1 conv halving the
  channels (compression 0.5), 2x2 stride-2 average pool;
* a final norm-ReLU.

That is 1 + 2 * (6 + 12 + 24 + 16) + 3 = 120 convolutions plus the classifier:
121 layers. Channels: 64 -> 256 (block 1) -> 128 -> 512 (block 2) -> 256 -> 1024
(block 3) -> 512 -> 1024 (block 4). The layout and initial values follow
torchvision's ``densenet121`` (no conv biases, norm scale 1 and bias 0), so the
encoder has its 6,953,856 parameters without the 1000-way classifier.

The encoder returns the ResNets' features dict, one map per ResNet level and stride,
so ``unet.UNet``, ``unet.Classifier`` and the contrastive nets take it unchanged:

* ``"c1"``: stem output after norm-ReLU, before the max-pool (64 channels; stride 2,
  or 1 with ``small_input``);
* ``"c2"``, ``"c3"``, ``"c4"``: the output of dense blocks 1, 2, 3 after the
  following transition's norm-ReLU, before its 1x1 conv and pool (256, 512 and 1024
  channels; strides 4, 8, 16, or 1, 2, 4 with ``small_input``), the activated
  skip taps segmentation encoders conventionally use;
* ``"c5"``: dense block 4 after the final norm-ReLU (1024 channels; stride 32, or 8
  with ``small_input``), the map a CAM is computed on;
* ``"pooled"``: the global average of ``"c5"``, (B, 1024), as torchvision's
  classifier input.

Average pooling floors odd sizes (as torch's ``AvgPool2d``); the U-Net decoder
resizes to each skip's size, so any input size works.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models.resnet import _PAD3, Dtype, Features, _conv, make_norm


class DenseLayer(nn.Module):
  """Bottleneck layer: norm-ReLU-1x1 conv (bn_size * k)-norm-ReLU-3x3 conv (k).

  ``__call__(inputs, train)`` takes the block's feature pieces so far (a sequence of
  NHWC arrays), concatenates them and returns only the k new channels. With
  ``nn.remat`` around the layer, the concatenation and the bottleneck are recomputed
  in the backward pass and only the pieces are kept (the memory-efficient DenseNet of
  Pleiss et al., 2017), so activation memory grows linearly with depth.
  """
  growth_rate: int
  bn_size: int = 4
  norm: str = "batch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jnp.ndarray], train: bool) -> jnp.ndarray:
    conv = _conv(self.dtype)
    x = jnp.concatenate(list(inputs), axis=-1)
    y = nn.relu(make_norm(self.norm, x, train, name="norm1", dtype=self.dtype))
    y = conv(self.bn_size * self.growth_rate, (1, 1), name="conv1")(y)
    y = nn.relu(make_norm(self.norm, y, train, name="norm2", dtype=self.dtype))
    return conv(self.growth_rate, (3, 3), padding=_PAD3, name="conv2")(y)


class DenseNet(nn.Module):
  """DenseNet-BC encoder returning the ResNets' multi-scale features (see the module doc).

  Attributes:
    block_sizes: layers per dense block, (6, 12, 24, 16) for DenseNet-121.
    growth_rate: k, the channels each layer adds (32).
    num_init_features: stem width (64).
    bn_size: bottleneck width factor: the 1x1 conv has ``bn_size * k`` filters (4).
    compression: channel factor of each transition (0.5).
    norm: "batch", "group" or "none" (``resnet.make_norm``).
    small_input: 3x3 stride-1 stem without max-pool, for 28-64 px images.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are float32.
    remat: recompute each dense layer (its concatenated input, norms and convs) in the
      backward pass (``nn.remat``) instead of storing them. Parameters and results are
      unchanged.

  Parameter names: ``stem_conv``, ``stem_norm``, ``block<i>_<j>`` (dense layer j of
  block i, with ``norm1``, ``conv1``, ``norm2``, ``conv2``), ``transition<i>_norm``,
  ``transition<i>_conv`` (after block i) and ``final_norm``; i counts from 1, j from 0.
  """
  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  norm: str = "batch"
  small_input: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False

  def _widths(self) -> list[int]:
    """Channels of each dense block's output (before its transition)."""
    widths, c = [], self.num_init_features
    for i, n in enumerate(self.block_sizes):
      c += n * self.growth_rate
      widths.append(c)
      if i < len(self.block_sizes) - 1:
        c = int(c * self.compression)
    return widths

  @property
  def feature_dim(self) -> int:
    """Width of ``"pooled"`` (and of ``"c5"``): 1024 for DenseNet-121."""
    return self._widths()[-1]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> Features:
    if x.ndim != 4:
      raise ValueError(f"DenseNet expects NHWC images, got shape {x.shape}")
    x = x.astype(self.dtype)
    conv = _conv(self.dtype)
    if self.small_input:
      x = conv(self.num_init_features, (3, 3), padding=_PAD3, name="stem_conv")(x)
    else:
      x = conv(self.num_init_features, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
               name="stem_conv")(x)
    x = nn.relu(make_norm(self.norm, x, train, name="stem_norm", dtype=self.dtype))
    feats = {"c1": x}
    if not self.small_input:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD3)
    layer_cls = DenseLayer
    if self.remat:  # `train` (argument 2, counting self) selects Python control flow.
      layer_cls = nn.remat(DenseLayer, static_argnums=(2,))
    last = len(self.block_sizes) - 1
    for i, n_layers in enumerate(self.block_sizes):
      pieces = [x]
      for j in range(n_layers):
        pieces.append(layer_cls(growth_rate=self.growth_rate, bn_size=self.bn_size,
                                norm=self.norm, dtype=self.dtype,
                                name=f"block{i + 1}_{j}")(tuple(pieces), train))
      x = jnp.concatenate(pieces, axis=-1)
      if i == last:
        x = nn.relu(make_norm(self.norm, x, train, name="final_norm", dtype=self.dtype))
        feats[f"c{i + 2}"] = x
      else:
        x = nn.relu(make_norm(self.norm, x, train, name=f"transition{i + 1}_norm",
                              dtype=self.dtype))
        feats[f"c{i + 2}"] = x
        x = conv(int(x.shape[-1] * self.compression), (1, 1),
                 name=f"transition{i + 1}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    feats["pooled"] = jnp.mean(x, axis=(1, 2))
    return feats


_SPECS: dict[str, dict[str, Any]] = {
    "densenet121": dict(block_sizes=(6, 12, 24, 16), growth_rate=32, num_init_features=64),
}
DENSENET_NAMES = tuple(_SPECS)


def get_densenet(name: str, /, **kw: Any) -> DenseNet:
  """Builds a named DenseNet; ``kw`` overrides DenseNet attributes (e.g. norm).

  Raises:
    ValueError: unknown ``name`` (the message lists the valid names).
  """
  if name not in _SPECS:
    raise ValueError(f"unknown DenseNet {name!r}; valid names: {list(_SPECS)}")
  return DenseNet(**{**_SPECS[name], **kw})


def densenet121(**kw: Any) -> DenseNet:
  """DenseNet-121 (k = 32, blocks (6, 12, 24, 16)): 6,953,856 parameters, 1024 features."""
  return get_densenet("densenet121", **kw)
