"""Convolutional attention blocks: CBAM and DRFL's Peakiness Fusion Attention Module.

* ``ChannelAttention``: CBAM's channel attention (Woo et al., ECCV 2018, eq. 2):
  M_c = sigmoid(MLP(avgpool(F)) + MLP(maxpool(F))), a shared two-layer MLP with
  reduction ratio 16 over the spatially pooled (B, C) vectors; output F * M_c.
* ``SpatialAttention``: CBAM's spatial attention (Woo et al., eq. 3):
  M_s = sigmoid(Conv7x7(Concat(mean_c(F), max_c(F)))); output F * M_s.
* ``PeakSpatialAttention``: DRFL's Peakiness Fusion Attention block (PFA; Xu et
  al., EAAI 2023, Sec. 3.3, Fig. 4b, eq. 14-15).
* ``PFAMBlock``: DRFL's Peakiness Fusion Attention Module (Fig. 4a), the block in
  every DRFL encoder and decoder level: two 3x3 convs, an attention, and a residual
  connection; ``attention="none"|"cbam"|"pfam"`` gives Table 7's ablation.

Reading of "CBAM" in Table 7 ("DFM + RFTM + CBAM" against DRFL): the full CBAM, channel
attention followed by CBAM's own spatial attention (avg + max over channels, 7x7 conv).
PFAM keeps CBAM's channel attention and replaces the spatial attention with PFA
(Sec. 3.3: "we use the same channel attention module as the CBAM"), so the two rows
differ only in the spatial map.

Parameters are float32; convolutions and the MLP run in ``dtype``; the attention maps
(sigmoids) are computed in float32 and returned as float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models import conv_grad
from medrep_jax.models.resnet import Dtype, make_norm

ATTENTIONS = ("none", "cbam", "pfam")


def conv(features: int, kernel: int, dtype: Dtype, name: str, *, stride: int = 1,
         dilation: int = 1, use_bias: bool = True) -> nn.Conv:
  """A k x k "SAME"-padded NHWC conv with float32 parameters.

  Plain convs take the matmul weight gradient of ``conv_grad`` on CPU (dilated ones
  fall through to XLA's convolution unchanged).
  """
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME",
                 kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, name=name,
                 conv_general_dilated=conv_grad.conv_general_dilated)


def max_gather(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """The max over `axis` (kept, size 1) as a gather at the argmax.

  Its gradient goes to one arg-max element through the gather. `jnp.max`'s gradient
  instead divides by the count of elements equal to the max; under jit, XLA:CPU may
  recompute the input in two fusions that differ in the last bit, the count becomes 0 and
  the gradient NaN (seen in DRFL training from the second step on).
  """
  idx = jnp.argmax(x, axis=axis, keepdims=True)
  return jnp.take_along_axis(x, idx, axis=axis)


class ChannelAttention(nn.Module):
  """CBAM channel attention (Woo et al., 2018, eq. 2), used by PFAM (DRFL Fig. 4a).

  M_c = sigmoid(W1 relu(W0 avgpool(F)) + W1 relu(W0 maxpool(F))), W0: C -> C // ratio,
  W1: C // ratio -> C, no biases (as CBAM's 1x1 convs). Output F * M_c.

  Attributes:
    ratio: MLP reduction ratio r (16); the hidden width is max(C // r, 1).
    dtype: compute dtype.

  ``__call__(x (B, H, W, C), return_map=False)`` -> (B, H, W, C), plus the float32
  map M_c (B, 1, 1, C) in [0, 1] when ``return_map``.
  """
  ratio: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, return_map: bool = False):
    c = x.shape[-1]
    dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=self.dtype,
                                         param_dtype=jnp.float32, name=name)
    fc1, fc2 = dense(max(c // self.ratio, 1), "fc1"), dense(c, "fc2")
    mlp = lambda v: fc2(nn.relu(fc1(v.astype(self.dtype))))
    avg = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    b, h, w, _ = x.shape
    mx = max_gather(x.reshape(b, h * w, c), 1)[:, 0].astype(jnp.float32)
    m = nn.sigmoid(mlp(avg).astype(jnp.float32) + mlp(mx).astype(jnp.float32))
    m = m[:, None, None, :]
    out = (x * m.astype(x.dtype)).astype(self.dtype)
    return (out, m) if return_map else out


class SpatialAttention(nn.Module):
  """CBAM spatial attention (Woo et al., 2018, eq. 3).

  M_s = sigmoid(Conv_{k x k}(Concat(mean_c(F), max_c(F)))), one output channel, no
  bias; output F * M_s.

  Attributes:
    kernel: conv size (7, as CBAM).
    dtype: compute dtype.

  ``__call__(x, return_map=False)`` -> (B, H, W, C), plus the float32 map
  (B, H, W, 1) in [0, 1] when ``return_map``.
  """
  kernel: int = 7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, return_map: bool = False):
    pooled = jnp.concatenate([jnp.mean(x, -1, keepdims=True, dtype=jnp.float32),
                              max_gather(x, -1).astype(jnp.float32)], -1)
    logit = conv(1, self.kernel, self.dtype, "conv", use_bias=False)(
        pooled.astype(self.dtype))
    m = nn.sigmoid(logit.astype(jnp.float32))
    out = (x * m.astype(x.dtype)).astype(self.dtype)
    return (out, m) if return_map else out


class PeakSpatialAttention(nn.Module):
  """Peakiness Fusion Attention block (PFA; DRFL Sec. 3.3, Fig. 4b, eq. 14-15).

    A      = avgpool(F)                          (B, H, W, 1): mean over channels
    F_peak = F - A                                eq. 14
    F_spa  = sigmoid(Conv3x3(Concat(Conv3x3(F_peak), A)))   eq. 15
    out    = F * F_spa

  "avgpool" is the mean over the channel axis, a one-channel map, as in the authors'
  code (and as CBAM's channel pooling); the inner conv maps C -> 1 and the outer 2 -> 1,
  both 3x3 without bias. Eq. 15 as printed concatenates F_or itself rather than
  avgpool(F_or); the text ("the obtained feature map [after avgpool] and peak map are
  connected") and the code use the pooled map, as here.

  Attributes:
    kernel: size of both convs (3).
    dtype: compute dtype.

  ``__call__(x, return_map=False)`` -> (B, H, W, C), plus the float32 map F_spa
  (B, H, W, 1) in [0, 1] when ``return_map``.
  """
  kernel: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, return_map: bool = False):
    avg = jnp.mean(x, -1, keepdims=True, dtype=jnp.float32)
    peak = x.astype(jnp.float32) - avg                                  # eq. 14
    peak = conv(1, self.kernel, self.dtype, "peak_conv", use_bias=False)(
        peak.astype(self.dtype))
    both = jnp.concatenate([peak.astype(jnp.float32), avg], -1)
    logit = conv(1, self.kernel, self.dtype, "fuse_conv", use_bias=False)(
        both.astype(self.dtype))
    m = nn.sigmoid(logit.astype(jnp.float32))                           # eq. 15
    out = (x * m.astype(x.dtype)).astype(self.dtype)
    return (out, m) if return_map else out


class PFAMBlock(nn.Module):
  """Peakiness Fusion Attention Module (DRFL Sec. 3.3, Fig. 4a), a residual block.

    y   = act(norm1(Conv3x3(x)))
    y   = norm2(Conv3x3(y))
    y   = PFA(CA(y))          attention="pfam": CBAM channel attention, then eq. 14-15
        = SA(CA(y))           attention="cbam": the full CBAM (Table 7)
        = y                   attention="none": the two convs only
    out = act(x' + y)         x' = x, or a 1x1 conv (+ norm) when the width changes

  The two convs, norms and the residual are the same in all three kinds, so the ablation
  changes only the attention. The authors' code uses a ResNet BasicBlock (BatchNorm,
  ReLU) here; ``norm`` is a field.

  Attributes:
    features: output width (the input width when 0).
    attention: "none", "cbam" or "pfam".
    norm: "batch", "group" or "none" (``resnet.make_norm``).
    ratio: channel-attention reduction ratio (16).
    dtype: compute dtype.

  ``__call__(x, train, return_maps=False)`` -> (B, H, W, features), plus a dict of the
  float32 attention maps ({"channel", "spatial"}, present by kind) when ``return_maps``.
  """
  features: int = 0
  attention: str = "pfam"
  norm: str = "batch"
  ratio: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, return_maps: bool = False):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    width = self.features or x.shape[-1]
    x = x.astype(self.dtype)
    bias = self.norm == "none"
    y = conv(width, 3, self.dtype, "conv1", use_bias=bias)(x)
    y = nn.relu(make_norm(self.norm, y, train, name="norm1", dtype=self.dtype))
    y = conv(width, 3, self.dtype, "conv2", use_bias=bias)(y)
    y = make_norm(self.norm, y, train, name="norm2", dtype=self.dtype)
    maps = {}
    if self.attention != "none":
      y, maps["channel"] = ChannelAttention(self.ratio, self.dtype, name="channel")(
          y, return_map=True)
      spatial = (PeakSpatialAttention(dtype=self.dtype, name="pfa")
                 if self.attention == "pfam" else
                 SpatialAttention(dtype=self.dtype, name="spatial"))
      y, maps["spatial"] = spatial(y, return_map=True)
    if width != x.shape[-1]:
      x = conv(width, 1, self.dtype, "shortcut", use_bias=bias)(x)
      x = make_norm(self.norm, x, train, name="shortcut_norm", dtype=self.dtype)
    out = nn.relu(x + y)
    return (out, maps) if return_maps else out
