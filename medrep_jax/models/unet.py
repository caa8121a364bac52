"""U-Net encoder and decoder, the U-Net over any encoder, and an encoder+head classifier.

Every encoder here returns the same features dict as ``resnet.ResNet``: keys
``"c1"``..``"cN"`` (shallow to deep) plus ``"pooled"`` (B, C). Every composite
model keeps its encoder as a submodule named ``encoder``, so pretrained
encoder parameters can be copied into ``params["encoder"]`` by path.

The modules are rank-generic: the ``"_3d"`` encoders (``"resnet18_3d"``,
``"unet_encoder_3d"``, ...) take NDHWC volumes (CAMContrast Sec. 4.7), and
``ConvBlock``, ``UNetDecoder``, ``Classifier`` and ``UNet`` follow their input's
rank (3x3x3 convs, trilinear upsampling; ``upsample="transpose"`` is 2-D only).

References: Ronneberger et al., "U-Net", MICCAI 2015 (classic U-Net); the
DCL-CsTP paper (IEEE Access 2025, Sec. III-E) fine-tunes a U-Net decoder on
the ResNet-50 stages with skips.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medrep_jax.models import densenet, resnet
from medrep_jax.models.conv_transpose import ConvTranspose2x
from medrep_jax.models.resnet import Dtype, Features, make_norm, pads, window


def feature_keys(features: Mapping[str, jnp.ndarray]) -> list[str]:
  """The ``"c<i>"`` keys of a features dict, shallow to deep."""
  keys = [k for k in features if k.startswith("c") and k[1:].isdigit()]
  return sorted(keys, key=lambda k: int(k[1:]))


def last_feature_map(features: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """The deepest feature map (the map a CAM is computed on)."""
  return features[feature_keys(features)[-1]]


class ConvBlock(nn.Module):
  """``num_convs`` x (3x3 conv -> norm -> ReLU); 3x3x3 convs on NDHWC input."""
  features: int
  norm: str = "batch"
  num_convs: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    for i in range(self.num_convs):
      x = nn.Conv(self.features, window(3, x), padding=pads(1, x),
                  use_bias=self.norm == "none", dtype=self.dtype,
                  param_dtype=jnp.float32, name=f"conv{i + 1}")(x)
      x = nn.relu(make_norm(self.norm, x, train, name=f"norm{i + 1}",
                            dtype=self.dtype))
    return x


def resize(x: jnp.ndarray, hw: Sequence[int]) -> jnp.ndarray:
  """Bilinear resize of NHWC ``x`` to spatial size ``hw`` (half-pixel centres);
  trilinear for NDHWC ``x`` and a (d, h, w) size."""
  if x.shape[1:-1] == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear")


class UNetDecoder(nn.Module):
  """U-Net decoder over an encoder features dict.

  Starting from the deepest map, each step upsamples x2 (bilinear, or a 2x2
  transposed conv with ``upsample="transpose"`` as in Ronneberger et al.),
  concatenates the next shallower skip and applies two 3x3 conv-norm-ReLU.
  If the shallowest skip is still below ``output_size`` (ResNet ``c1`` has
  stride 2), one more upsample + conv block without skip reaches full
  resolution. A 1x1 conv gives ``num_classes`` float32 logits.

  Attributes:
    widths: one width per decoding step, deep to shallow; extra entries are
      unused, too few raise ValueError.
    num_classes: output channels.
    norm: "batch", "group" or "none".
    upsample: "bilinear" or "transpose".
    dtype: compute dtype.
  """
  widths: Sequence[int]
  num_classes: int
  norm: str = "batch"
  upsample: str = "bilinear"
  dtype: Dtype = jnp.float32

  def _up(self, x: jnp.ndarray, hw: Sequence[int], width: int,
          name: str) -> jnp.ndarray:
    if self.upsample == "bilinear":
      return resize(x, hw)
    if self.upsample == "transpose" and x.ndim != 4:
      raise ValueError(f"upsample='transpose' is 2-D only; use 'bilinear' (trilinear) for "
                       f"features of shape {x.shape}")
    if self.upsample == "transpose":
      x = ConvTranspose2x(width, 2, dtype=self.dtype, name=name)(x)
      return resize(x, hw)
    raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {self.upsample!r}")

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray], train: bool,
               output_size: Sequence[int] | None = None) -> jnp.ndarray:
    keys = feature_keys(features)
    if not keys:
      raise ValueError(f"features has no 'c<i>' keys: {sorted(features)}")
    x = features[keys[-1]]
    skips = [features[k] for k in reversed(keys[:-1])]
    shallow_hw = (skips[-1] if skips else x).shape[1:-1]
    final = output_size is not None and tuple(output_size) != shallow_hw
    n_steps = len(skips) + int(bool(final))
    if len(self.widths) < n_steps:
      raise ValueError(f"decoder needs {n_steps} widths for features {keys} and "
                       f"output_size {output_size}, got widths={tuple(self.widths)}")
    for i, skip in enumerate(skips):
      x = self._up(x, skip.shape[1:-1], self.widths[i], name=f"up{i}")
      x = jnp.concatenate([x.astype(self.dtype), skip.astype(self.dtype)], -1)
      x = ConvBlock(self.widths[i], self.norm, dtype=self.dtype,
                    name=f"block{i}")(x, train)
    if final:
      i = len(skips)
      x = self._up(x, tuple(output_size), self.widths[i], name=f"up{i}")
      x = ConvBlock(self.widths[i], self.norm, dtype=self.dtype,
                    name=f"block{i}")(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     param_dtype=jnp.float32, name="logits")(x)
    return logits.astype(jnp.float32)


class UNetEncoder(nn.Module):
  """Contracting path of the classic U-Net.

  Level i applies two 3x3 conv-norm-ReLU at width ``widths[i]`` after a 2x2
  max-pool (no pool at level 0). Returns ``{"c1": stride 1, ..., "cN": stride
  2**(N-1), "pooled": GAP of cN}``. With ``spatial_dims=3`` (``"unet_encoder_3d"``)
  it takes NDHWC volumes: 3x3x3 convs, 2x2x2 pools, GAP over D, H, W (the U-Net
  encoder as f_I of CAMContrast Sec. 4.2 on the volumes of Sec. 4.7).
  """
  widths: Sequence[int] = (32, 64, 128, 256)
  norm: str = "batch"
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each level's activations in the backward pass
  spatial_dims: int = 2

  @property
  def feature_dim(self) -> int:
    return self.widths[-1]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> Features:
    resnet.check_input(x, self.spatial_dims, "UNetEncoder")
    x = x.astype(self.dtype)
    feats = {}
    block = nn.remat(ConvBlock, static_argnums=(2,)) if self.remat else ConvBlock
    for i, w in enumerate(self.widths):
      if i > 0:
        x = nn.max_pool(x, window(2, x), strides=window(2, x))
      x = block(w, self.norm, dtype=self.dtype, name=f"level{i + 1}")(x, train)
      feats[f"c{i + 1}"] = x
    feats["pooled"] = resnet.global_pool(x)
    return feats


UNET_ENCODER_NAMES = ("unet_encoder", "unet_encoder" + resnet.SUFFIX_3D)
# 2-D names first (the order configs list them in), then the 3-D encoders (Sec. 4.7).
ENCODER_NAMES = (resnet.RESNET_NAMES + densenet.DENSENET_NAMES + UNET_ENCODER_NAMES[:1]
                 + resnet.RESNET_3D_NAMES + UNET_ENCODER_NAMES[1:])


def encoder_from_config(model_cfg: Any, dtype: Dtype = jnp.float32,
                        remat: bool = False) -> nn.Module:
  """The encoder a run's `config.model` describes (`encoder`, `norm`, `small_input`,
  `unet_widths`, and optionally `width`: the first-stage width of a ResNet, 0 or absent
  for the named default), shared by fine-tuning, pretraining and feature networks;
  `dtype` and `remat` come from the run's top-level `config.dtype` and `config.remat`."""
  kw: dict[str, Any] = dict(norm=model_cfg.norm, dtype=dtype, remat=bool(remat))
  if model_cfg.encoder in UNET_ENCODER_NAMES:
    kw["widths"] = tuple(model_cfg.get("unet_widths", (32, 64, 128, 256)))
  else:
    kw["small_input"] = bool(model_cfg.get("small_input", False))
  width = int(model_cfg.get("width", 0) or 0)
  if width:
    if resnet.split_spatial(model_cfg.encoder)[0] not in resnet.RESNET_NAMES:
      raise ValueError(f"model.width sets a ResNet's first-stage width; encoder "
                       f"{model_cfg.encoder!r} is not a ResNet (use unet_widths for a U-Net)")
    kw["num_filters"] = width
  return get_encoder(model_cfg.encoder, **kw)


def get_encoder(name: str, /, **kw: Any) -> nn.Module:
  """Encoder by name (``ENCODER_NAMES``): a ResNet or DenseNet name, "unet_encoder", or a
  3-D encoder "resnet*_3d" / "unet_encoder_3d" (NDHWC volumes); ``kw`` are its attributes.

  Raises:
    ValueError: unknown ``name`` (the message lists the valid names).
  """
  if name in resnet.RESNET_NAMES + resnet.RESNET_3D_NAMES:
    return resnet.get_resnet(name, **kw)
  if name in densenet.DENSENET_NAMES:
    return densenet.get_densenet(name, **kw)
  if name in UNET_ENCODER_NAMES:
    resnet.spatial_name(name, kw)
    return UNetEncoder(**kw)
  raise ValueError(f"unknown encoder {name!r}; valid names: {list(ENCODER_NAMES)}")


def _encode(module: nn.Module, x: jnp.ndarray, train: bool) -> Features:
  """Runs `module.encoder` (a module, bound as child "encoder", or a `get_encoder` name);
  with `train_encoder=False` its BatchNorm runs in inference mode and no gradient reaches it
  (a frozen encoder: linear probe, frozen-encoder segmentation)."""
  enc = module.encoder
  if isinstance(enc, str):
    enc = get_encoder(enc, name="encoder")
  feats = enc(x, train and module.train_encoder)
  return feats if module.train_encoder else jax.lax.stop_gradient(feats)


class Classifier(nn.Module):
  """Encoder + linear head on pooled features (DCL-CsTP eq. 8, CAMContrast eq. 1).

  Rank-generic: with a 3-D encoder (``get_encoder("resnet18_3d")``) it classifies NDHWC
  volumes, and the CAM lives on the last (d, h, w) feature grid (CAMContrast Sec. 4.7).

  Attributes:
    num_classes: logits width.
    encoder: an encoder module (e.g. ``get_encoder("resnet18", norm="group")``)
      or a name for ``get_encoder`` with default attributes; in both cases the
      submodule is named ``encoder``.
    train_encoder: False freezes the encoder (linear evaluation).
    head_norm: standardize the pooled features before the head with a BatchNorm without
      scale or bias (batch statistics in training, running ones at eval), as linear
      probing does (He et al., MAE, 2022, Sec. A.2): the head then sees unit-scale
      features whatever the encoder's, so one learning rate suits every encoder.

  ``__call__(x, train, return_features=False)`` returns float32 logits
  (B, num_classes), or ``(logits, features)`` where ``features`` is the
  encoder's dict; a CAM is ``last_feature_map(features) @
  params["head"]["kernel"]``.
  """
  num_classes: int
  encoder: Any = "resnet50"
  train_encoder: bool = True
  head_norm: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, return_features: bool = False):
    feats = _encode(self, x, train)
    pooled = feats["pooled"].astype(jnp.float32)
    if self.head_norm:
      pooled = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                            momentum=0.9, epsilon=1e-6, name="head_norm")(pooled)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                      name="head")(pooled)
    return (logits, feats) if return_features else logits


class UNet(nn.Module):
  """U-Net: any encoder's feature pyramid + `UNetDecoder` with skips (DCL-CsTP Sec. III-E,
  trained with eq. 9; with `encoder=UNetEncoder(...)` and `upsample="transpose"` it is the
  classic U-Net of Ronneberger et al.).

  Attributes:
    num_classes: logit channels (1 for binary masks with BCE/IoU losses).
    encoder: an encoder module or a `get_encoder` name; the submodule is named
      ``encoder``, so ``params["encoder"]`` matches a pretrained encoder's params.
    decoder_widths: deep to shallow; 5 steps are used with the ResNet ImageNet stem
      (c5->c4->c3->c2->c1->full res), 4 with ``small_input``.
    norm, upsample, dtype: of the decoder.
    train_encoder: False freezes the encoder.

  ``__call__(x, train) -> logits (B, H, W, num_classes)``, float32, at the input size
  ((B, D, H, W, num_classes) for a 3-D encoder on volumes, with bilinear upsampling).
  """
  num_classes: int
  encoder: Any = "resnet50"
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  upsample: str = "bilinear"
  dtype: Dtype = jnp.float32
  train_encoder: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    feats = _encode(self, x, train)
    return UNetDecoder(self.decoder_widths, self.num_classes, self.norm, self.upsample,
                       self.dtype, name="decoder")(feats, train, output_size=x.shape[1:-1])
