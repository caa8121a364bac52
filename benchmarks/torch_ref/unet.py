"""PyTorch U-Net, classic U-Net encoder and classifier shaped like ``medrep_jax.models.unet``.

Written from the U-Net paper (Ronneberger et al., MICCAI 2015) and the DCL-CsTP
fine-tuning setup (a U-Net decoder with skips on the encoder's stages, a linear
head on pooled features), with the options the flax modules have:

* ``ConvBlock``: ``num_convs`` x (3x3 conv, norm, ReLU); the conv has a bias
  only without a norm.
* ``UNetEncoder``: level i = 2x2 max-pool (not at level 0) + ``ConvBlock``.
* ``UNetDecoder``: from the deepest map, upsample to the next skip's size
  (bilinear with half-pixel centres, or a 2x2 stride-2 transposed conv then a
  resize), concatenate the skip, ``ConvBlock``; one more upsample + block when
  the shallowest skip is smaller than the input (ResNet ``c1`` has stride 2);
  a 1x1 conv to the logits.
* ``Classifier``: encoder, global average pool, optionally ``head_norm`` (a
  BatchNorm without scale or bias), ``head`` linear layer.

Norms: "batch" (BatchNorm, eps 1e-5), "group" (GroupNorm with the largest
group count <= 32 that divides the channels, eps 1e-5) or "none". ResNet
encoders are ``benchmarks.torch_ref.resnet.ResNet`` with their norms swapped
to match. Submodules carry the flax names (``encoder.layer1_0.conv1``,
``decoder.block0.norm1``, ``head``), so the state dict that
``medrep_jax.export`` writes loads with ``load_state_dict(strict=True)``, and
``build(description)`` makes the network from that export's ``model.json``.
Tensors are NCHW.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref.resnet import SPECS, ResNet

NORMS = ("batch", "group", "none")
Features = dict[str, torch.Tensor]


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest number of groups <= ``max_groups`` that divides ``channels``."""
  return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def make_norm(kind: str, channels: int) -> nn.Module:
  """The norm layer of ``kind`` ("batch", "group" or "none") over ``channels``."""
  if kind == "batch":
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  if kind == "group":
    return nn.GroupNorm(group_count(channels), channels, eps=1e-5)
  if kind == "none":
    return nn.Identity()
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def resize(x: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
  """Bilinear resize with half-pixel centres, antialiased when shrinking.

  ``jax.image.resize(..., "bilinear")`` (antialias on by default): a triangle
  kernel, widened by the scale when shrinking, with weights renormalized at
  the borders. Torch's antialiased bilinear computes the same weights.
  """
  hw = tuple(int(s) for s in hw)
  if tuple(x.shape[-2:]) == hw:
    return x
  return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


class ConvBlock(nn.Module):
  """``num_convs`` x (3x3 conv -> norm -> ReLU), named conv1/norm1, conv2/norm2, ..."""

  def __init__(self, cin: int, features: int, norm: str = "batch", num_convs: int = 2):
    super().__init__()
    self.num_convs = num_convs
    for i in range(num_convs):
      self.add_module(f"conv{i + 1}", nn.Conv2d(cin if i == 0 else features, features, 3,
                                                padding=1, bias=norm == "none"))
      self.add_module(f"norm{i + 1}", make_norm(norm, features))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i in range(self.num_convs):
      x = torch.relu(getattr(self, f"norm{i + 1}")(getattr(self, f"conv{i + 1}")(x)))
    return x


class UNetEncoder(nn.Module):
  """Contracting path of the classic U-Net; ``forward`` returns c1..cN and pooled."""

  def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64, 128, 256),
               norm: str = "batch"):
    super().__init__()
    self.widths = tuple(int(w) for w in widths)
    cin = in_channels
    for i, w in enumerate(self.widths):
      self.add_module(f"level{i + 1}", ConvBlock(cin, w, norm))
      cin = w

  @property
  def channels(self) -> list[int]:
    """Channels of c1..cN."""
    return list(self.widths)

  def forward(self, x: torch.Tensor) -> Features:
    feats = {}
    for i in range(len(self.widths)):
      if i > 0:
        x = F.max_pool2d(x, 2, 2)
      x = getattr(self, f"level{i + 1}")(x)
      feats[f"c{i + 1}"] = x
    feats["pooled"] = x.mean(dim=(2, 3))
    return feats


def resnet_encoder(name: str, in_channels: int, small_input: bool = False,
                   norm: str = "batch") -> ResNet:
  """``torch_ref.resnet.ResNet`` with its BatchNorms replaced by ``norm`` layers."""
  net = ResNet(name, in_channels, small_input)
  if norm != "batch":
    for parent in list(net.modules()):
      for child_name, child in list(parent.named_children()):
        if isinstance(child, nn.BatchNorm2d):
          setattr(parent, child_name, make_norm(norm, child.num_features))
  return net


def _resnet_stages(net: ResNet) -> list[list[str]]:
  stages: dict[str, list[str]] = {}
  for name in net.block_names:  # "layer<stage>_<block>"
    stages.setdefault(name.split("_")[0], []).append(name)
  return list(stages.values())


def encoder_channels(encoder: nn.Module) -> list[int]:
  """Channels of the encoder's c1..cN, shallow to deep."""
  if isinstance(encoder, UNetEncoder):
    return encoder.channels
  out = [encoder.stem_conv.out_channels]
  for names in _resnet_stages(encoder):
    last = getattr(encoder, names[-1])
    out.append(getattr(last, "conv3", last.conv2).out_channels)
  return out


def encoder_features(encoder: nn.Module, x: torch.Tensor) -> Features:
  """The flax features dict: "c1".."cN" (shallow to deep) and "pooled" (B, C)."""
  if isinstance(encoder, UNetEncoder):
    return encoder(x)
  x = torch.relu(encoder.stem_norm(encoder.stem_conv(x)))
  feats = {"c1": x}
  if not encoder.small_input:
    x = F.max_pool2d(x, 3, 2, 1)
  for i, names in enumerate(_resnet_stages(encoder)):
    for name in names:
      x = getattr(encoder, name)(x)
    feats[f"c{i + 2}"] = x
  feats["pooled"] = x.mean(dim=(2, 3))
  return feats


class UNetDecoder(nn.Module):
  """U-Net decoder over an encoder's features (see the module docstring).

  Args:
    channels: channels of the encoder's c1..cN, shallow to deep.
    widths: one width per decoding step, deep to shallow.
    num_classes: logit channels.
    norm: "batch", "group" or "none".
    upsample: "bilinear" or "transpose".
    final: add the step past the shallowest skip (an encoder whose c1 is
      smaller than its input).
  """

  def __init__(self, channels: Sequence[int], widths: Sequence[int], num_classes: int,
               norm: str = "batch", upsample: str = "bilinear", final: bool = False):
    super().__init__()
    if upsample not in ("bilinear", "transpose"):
      raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
    skips = list(reversed(channels[:-1]))
    n_steps = len(skips) + int(final)
    if len(widths) < n_steps:
      raise ValueError(f"decoder needs {n_steps} widths for {len(channels)} feature maps"
                       f"{' and a final step' if final else ''}, got widths={tuple(widths)}")
    self.upsample, self.n_skips, self.final = upsample, len(skips), final
    x_ch = channels[-1]
    for i in range(n_steps):
      skip_ch = skips[i] if i < len(skips) else 0
      if upsample == "transpose":
        self.add_module(f"up{i}", nn.ConvTranspose2d(x_ch, widths[i], 2, stride=2))
        x_ch = widths[i]
      self.add_module(f"block{i}", ConvBlock(x_ch + skip_ch, widths[i], norm))
      x_ch = widths[i]
    self.logits = nn.Conv2d(x_ch, num_classes, 1)

  def _up(self, x: torch.Tensor, hw: Sequence[int], i: int) -> torch.Tensor:
    if self.upsample == "transpose":
      x = getattr(self, f"up{i}")(x)
    return resize(x, hw)

  def forward(self, features: Mapping[str, torch.Tensor],
              output_size: Sequence[int] | None = None) -> torch.Tensor:
    keys = sorted((k for k in features if k[:1] == "c" and k[1:].isdigit()),
                  key=lambda k: int(k[1:]))
    x = features[keys[-1]]
    skips = [features[k] for k in reversed(keys[:-1])]
    shallow_hw = tuple((skips[-1] if skips else x).shape[-2:])
    final = output_size is not None and tuple(output_size) != shallow_hw
    if len(skips) != self.n_skips or (final and not self.final):
      raise ValueError(f"decoder built for {self.n_skips} skips (final step: {self.final}) got "
                       f"{len(skips)} skips and output size {output_size} vs {shallow_hw}")
    for i, skip in enumerate(skips):
      x = torch.cat([self._up(x, skip.shape[-2:], i), skip], dim=1)
      x = getattr(self, f"block{i}")(x)
    if final:
      i = len(skips)
      x = getattr(self, f"block{i}")(self._up(x, output_size, i))
    return self.logits(x)


class UNet(nn.Module):
  """Encoder features + ``UNetDecoder``; ``forward(x)`` -> logits (B, K, H, W)."""

  def __init__(self, encoder: nn.Module, num_classes: int,
               decoder_widths: Sequence[int] = (256, 128, 64, 32, 16), norm: str = "batch",
               upsample: str = "bilinear"):
    super().__init__()
    self.encoder = encoder
    # ResNet's c1 has stride 2 with the ImageNet stem; the U-Net encoder's has stride 1.
    final = isinstance(encoder, ResNet) and not encoder.small_input
    self.decoder = UNetDecoder(encoder_channels(encoder), decoder_widths, num_classes, norm,
                               upsample, final)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.decoder(encoder_features(self.encoder, x), output_size=x.shape[-2:])


class Classifier(nn.Module):
  """Encoder + linear ``head`` on pooled features; ``forward(x)`` -> logits (B, K).

  With ``head_norm``, the pooled features are standardized first by a BatchNorm
  without scale or bias (eps 1e-6), as in linear probing.
  """

  def __init__(self, encoder: nn.Module, num_classes: int, head_norm: bool = False):
    super().__init__()
    self.encoder = encoder
    width = encoder_channels(encoder)[-1]
    if head_norm:
      self.head_norm = nn.BatchNorm1d(width, eps=1e-6, momentum=0.1, affine=False)
    self.head = nn.Linear(width, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pooled = encoder_features(self.encoder, x)["pooled"]
    if hasattr(self, "head_norm"):
      pooled = self.head_norm(pooled)
    return self.head(pooled)


# ---------------------------------------------------------------- from model.json


def _class(desc: Mapping[str, Any]) -> str:
  return str(desc["class"]).rsplit(".", 1)[-1]


def resnet_name(stage_sizes: Sequence[int], block: str, num_filters: int) -> str:
  """The ``SPECS`` name of a ResNet layout; ValueError if it has none."""
  for name, spec in SPECS.items():
    if spec == (tuple(int(s) for s in stage_sizes), block, int(num_filters)):
      return name
  raise ValueError(f"no torch ResNet with stage_sizes={tuple(stage_sizes)}, block={block!r}, "
                   f"num_filters={num_filters}; known: {list(SPECS)}")


def build_encoder(desc: Mapping[str, Any], in_channels: int) -> nn.Module:
  """A torch encoder from a flax ``ResNet`` or ``UNetEncoder`` description."""
  f = desc["fields"]
  if _class(desc) == "ResNet":
    name = resnet_name(f["stage_sizes"], f["block"], f["num_filters"])
    return resnet_encoder(name, in_channels, bool(f["small_input"]), f["norm"])
  if _class(desc) == "UNetEncoder":
    return UNetEncoder(in_channels, f["widths"], f["norm"])
  raise ValueError(f"no torch reference encoder for {desc['class']}")


def build(description: Mapping[str, Any]) -> nn.Module:
  """The torch network of a ``medrep_jax.export`` ``model.json`` (its parsed dict).

  Uses ``description["architecture"]`` (the flax module and its fields) and
  ``description["input"]["channels"]``. A ``Classifier`` or ``UNet`` is returned
  as such, an exported bare encoder as the encoder (see ``encoder_features``).
  """
  arch, in_channels = description["architecture"], int(description["input"]["channels"])
  kind, f = _class(arch), arch["fields"]
  if kind in ("ResNet", "UNetEncoder"):
    return build_encoder(arch, in_channels)
  if kind == "Classifier":
    return Classifier(build_encoder(f["encoder"], in_channels), int(f["num_classes"]),
                      bool(f.get("head_norm", False)))
  if kind == "UNet":
    return UNet(build_encoder(f["encoder"], in_channels), int(f["num_classes"]),
                f["decoder_widths"], f["norm"], f["upsample"])
  raise ValueError(f"no torch reference network for {arch['class']}")
