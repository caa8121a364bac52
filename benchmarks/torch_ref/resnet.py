"""PyTorch ResNet-18/34/50 encoder shaped like ``medrep_jax.models.resnet``.

Written from the ResNet paper (He et al., 2016) in the v1.5 layout (stride on
the bottleneck's 3x3 conv), with the options the JAX encoder has: BatchNorm
(eps 1e-5, running-average momentum 0.1 = flax's 0.9), zero-initialized last
norm of each residual branch, and the small-input stem (3x3 stride-1 conv, no
max-pool). Submodules carry the flax names (``stem_conv``, ``layer1_0.conv1``,
``proj_norm``, ...), so ``flax_io.load_flax`` copies JAX weights in by path.
Tensors are NCHW (or channels-last memory format; the math is the same).
"""
from __future__ import annotations

import torch
from torch import nn

# name -> (blocks per stage, block kind, first-stage width), as the JAX presets.
SPECS: dict[str, tuple[tuple[int, ...], str, int]] = {
    "resnet_tiny": ((1, 1, 1, 1), "basic", 16),
    "resnet18": ((2, 2, 2, 2), "basic", 64),
    "resnet34": ((3, 4, 6, 3), "basic", 64),
    "resnet50": ((3, 4, 6, 3), "bottleneck", 64),
}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  layer = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
  nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
  return layer


def _bn(channels: int, zero: bool = False) -> nn.BatchNorm2d:
  layer = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  if zero:
    nn.init.zeros_(layer.weight)
  return layer


class _Residual(nn.Module):
  """Shared shortcut logic: identity, or 1x1 strided conv + BN on a shape change."""

  def _init_shortcut(self, cin: int, cout: int, stride: int) -> None:
    self.has_proj = stride != 1 or cin != cout
    if self.has_proj:
      self.proj_conv = _conv(cin, cout, 1, stride)
      self.proj_norm = _bn(cout)

  def shortcut(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj_norm(self.proj_conv(x)) if self.has_proj else x


class BasicBlock(_Residual):
  """Two 3x3 convs."""
  expansion = 1

  def __init__(self, cin: int, filters: int, stride: int):
    super().__init__()
    self.conv1, self.norm1 = _conv(cin, filters, 3, stride), _bn(filters)
    self.conv2, self.norm2 = _conv(filters, filters, 3), _bn(filters, zero=True)
    self._init_shortcut(cin, filters, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = torch.relu(self.norm1(self.conv1(x)))
    return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class BottleneckBlock(_Residual):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4."""
  expansion = 4

  def __init__(self, cin: int, filters: int, stride: int):
    super().__init__()
    self.conv1, self.norm1 = _conv(cin, filters, 1), _bn(filters)
    self.conv2, self.norm2 = _conv(filters, filters, 3, stride), _bn(filters)
    self.conv3, self.norm3 = _conv(filters, 4 * filters, 1), _bn(4 * filters, zero=True)
    self._init_shortcut(cin, 4 * filters, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = torch.relu(self.norm1(self.conv1(x)))
    y = torch.relu(self.norm2(self.conv2(y)))
    return torch.relu(self.norm3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
  """ResNet encoder; ``forward(x (B, C, H, W))`` returns the last stage's map.

  Args:
    name: a key of ``SPECS``.
    in_channels: image channels.
    small_input: 3x3 stride-1 stem without max-pool (the JAX ``small_input``).
  """

  def __init__(self, name: str, in_channels: int, small_input: bool = False):
    super().__init__()
    if name not in SPECS:
      raise ValueError(f"unknown ResNet {name!r}; valid: {list(SPECS)}")
    stages, kind, width = SPECS[name]
    block = BottleneckBlock if kind == "bottleneck" else BasicBlock
    self.small_input = small_input
    self.stem_conv = _conv(in_channels, width, 3 if small_input else 7,
                           1 if small_input else 2)
    self.stem_norm = _bn(width)
    self.block_names = []
    cin = width
    for i, n in enumerate(stages):
      for j in range(n):
        name_ij = f"layer{i + 1}_{j}"
        self.add_module(name_ij, block(cin, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
        self.block_names.append(name_ij)
        cin = width * 2 ** i * block.expansion
    self.feature_dim = cin

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = torch.relu(self.stem_norm(self.stem_conv(x)))
    if not self.small_input:
      x = nn.functional.max_pool2d(x, 3, 2, 1)
    for name in self.block_names:
      x = getattr(self, name)(x)
    return x
