"""Stride-2 transposed convolution as four sub-pixel convolutions (fast on XLA:CPU).

``nn.ConvTranspose`` lowers to a convolution over the input dilated with zeros
(``lhs_dilation=2``). XLA:CPU computes that dense: for a k x k kernel each input pixel
costs 4 k^2 multiply-adds where k^2 do work, and the weight gradient of a dilated
convolution takes XLA's slow batch-contracting path. A 4x4 stride-2 up-sampling of a
(16, 32, 32, 64) map took 1.38 s forward + backward on 2 cores; the form below 0.11 s.

The sub-pixel form (the phase decomposition of a strided transposed convolution): output
pixel o = 2 m + p (phase p in {0, 1} per axis) of ``lax.conv_transpose(x, w, (2, 2),
"SAME")`` is

    y[2m + p] = sum_d x[m + d] w[2 d + a - p],     a = lax's "SAME" front padding,

over the d in {-1, 0, 1} whose tap 2 d + a - p lies in [0, k). Each of the four phases
(p_y, p_x) is a small dense convolution of x (2 x 2 taps for k = 4, 1 x 1 for k = 2), and
the phases interleave into the 2H x 2W output. Its convolutions take ``conv_grad``'s
matmul weight gradient.

``ConvTranspose2x`` has ``nn.ConvTranspose``'s parameters (``kernel`` (k, k, C_in, C_out),
unflipped, and ``bias``) and initializer, so the same key gives the same weights and
checkpoints are interchangeable. The sub-pixel path runs on the CPU backend for maps of at
least ``SUBPIXEL_MIN_MACS`` multiply-adds (B H W k^2 C_in C_out): below that XLA's dense form
costs a few milliseconds a step while the four phases and their gradients take ~5-10x
longer to compile (measured: a (2, 16, 16, 16) -> 16 map, 3.4 vs 0.6 ms forward + backward,
0.3 vs 1.5-3 s to compile), which is what the tiny models of tests and smoke runs pay.
``MEDREP_CONV_TRANSPOSE=xla|subpixel`` forces one path on every size and backend.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medrep_jax.models import conv_grad

MODES = ("auto", "xla", "subpixel")
_NHWC = ("NHWC", "HWIO", "NHWC")
SUBPIXEL_MIN_MACS = 1 << 22  # "auto" keeps XLA's form below ~4M multiply-adds (docstring)


def use_subpixel(macs: int | None = None) -> bool:
  """Whether a stride-2 transposed conv of `macs` multiply-adds takes the sub-pixel form.

  Forced modes ignore `macs`; "auto" needs the CPU backend and `macs` >= SUBPIXEL_MIN_MACS
  (None: any size).
  """
  mode = conv_grad.cpu_mode("MEDREP_CONV_TRANSPOSE", MODES)
  if mode != "auto":
    return mode == "subpixel"
  return jax.default_backend() == "cpu" and (macs is None or macs >= SUBPIXEL_MIN_MACS)


def same_front_pad(k: int, stride: int = 2) -> int:
  """``lax.conv_transpose``'s "SAME" padding before the dilated input (its own rule)."""
  pad_len = k + stride - 2
  return k - 1 if stride > k - 1 else int(np.ceil(pad_len / 2))


def _phase_taps(k: int, phase: int) -> list[tuple[int, int]]:
  """(input offset d, kernel tap t) pairs of one output phase along one axis."""
  a = same_front_pad(k)
  return [(d, 2 * d + a - phase) for d in (-1, 0, 1) if 0 <= 2 * d + a - phase < k]


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``lax.conv_transpose(x, kernel, (2, 2), "SAME")`` (NHWC, HWIO) by sub-pixel phases.

  x: (B, H, W, C_in); kernel: (k, k, C_in, C_out), 2 <= k <= 4. Returns (B, 2H, 2W, C_out).
  """
  k = kernel.shape[0]
  if kernel.shape[1] != k or not 2 <= k <= 4:
    raise ValueError(f"conv_transpose_2x takes square kernels of size 2-4, got "
                     f"{kernel.shape[:2]}")
  b, h, w, _ = x.shape
  rows = []
  for py in range(2):
    ty = _phase_taps(k, py)
    cols = []
    for px in range(2):
      tx = _phase_taps(k, px)
      w_phase = kernel[np.array([t for _, t in ty])][:, np.array([t for _, t in tx])]
      # taps at offsets d0 .. d0 + n - 1: pad -d0 before and d0 + n - 1 after (no slicing)
      pads = tuple((-taps[0][0], taps[0][0] + len(taps) - 1) for taps in (ty, tx))
      cols.append(conv_grad.conv_general_dilated(
          x, w_phase.astype(x.dtype), (1, 1), pads, dimension_numbers=_NHWC))
    rows.append(jnp.stack(cols, 3))               # (B, H, W, p_x, C_out)
  y = jnp.stack(rows, 2)                          # (B, H, p_y, W, p_x, C_out)
  return y.reshape(b, 2 * h, 2 * w, kernel.shape[-1])


class ConvTranspose2x(nn.Module):
  """``nn.ConvTranspose(features, (k, k), (2, 2), padding="SAME")``: exactly doubles H, W.

  Same parameters, initializer and output as flax's module (module docstring); on CPU
  computed by ``conv_transpose_2x``.
  """
  features: int
  kernel_size: int = 4
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if use_subpixel(int(np.prod(x.shape)) * k * k * self.features):
      y = conv_transpose_2x(x, kernel)
    else:
      y = lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=_NHWC)
    return y if bias is None else y + bias
