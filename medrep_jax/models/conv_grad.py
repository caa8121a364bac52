"""2-D convolution whose weight gradient is a sum of matrix products (fast on XLA:CPU).

XLA computes a convolution's weight gradient as another convolution that contracts over the
batch. On CPU it re-lays the activations and output gradients out batch-last first, and those
transposes plus the batch-contracting convolution cost more than the forward pass
(docs/results/benchmarks.md, "Profiling the CPU gap"). Written per kernel tap, the same
gradient is

    dW[i, j] = sum_{b, y, x} x_pad[b, s*y + i, s*x + j, :]^T dy[b, y, x, :]

one (N, C_in)^T (N, C_out) matrix product per tap (i, j), N = batch * output pixels, with the
activations in their natural NHWC layout: a 1x1 convolution needs no copy at all and a k x k
one a strided slice per tap. The forward pass and the input gradient are XLA's own.
`conv_general_dilated` has `lax.conv_general_dilated`'s signature and is passed to `nn.Conv`
(`conv_general_dilated=`); cases it does not cover (other layouts, dilation, groups, 1-D/3-D)
go to `lax.conv_general_dilated` unchanged.

The matmul gradient is used on the CPU backend only (GPU and TPU convolution libraries have
fast weight gradients of their own), and there only where it pays: 1x1 and strided convs,
few output channels, and C_in C_out >= 64 x 64. For 3x3 stride-1 convs of 16-32 channels
XLA's own gradient is faster (weight gradient alone, one core: (16, 32, 32, 32) 15 vs
19 ms; (16, 64, 64, 8 -> 16) 8.6 vs 16 ms), and in a whole step the per-tap slices of many
such convs cost more still. The DRFL small step (one core, the three builds timed
interleaved in one process): matmul gradient on every conv 1.30 s, this rule 1.17 s, XLA's
gradient everywhere 1.06 s, so the rule is not yet the best split for small-channel nets.
ResNet-50's convs all meet the rule (1x1, strided or >= 64 x 64 channels) and keep the
matmul form (1x1 256 -> 64: 20 vs 78 ms). `MEDREP_CONV_WEIGHT_GRAD=xla|matmul` forces one
path on every conv and backend, e.g. for A/B timing.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
MODES = ("auto", "xla", "matmul")


def cpu_mode(variable: str, modes: Sequence[str]) -> str:
  """The mode env ``variable`` asks for: one of `modes` ("auto", off, forced on), default
  modes[0]. Raises ValueError naming the variable."""
  mode = os.environ.get(variable, modes[0]).strip().lower() or modes[0]
  if mode not in modes:
    raise ValueError(f"{variable} must be one of {tuple(modes)}, got {mode!r}")
  return mode


def cpu_path(variable: str, modes: Sequence[str]) -> bool:
  """Whether a CPU-tuned path is on: env ``variable`` is modes[2] (forced on), modes[1]
  (off) or modes[0] ("auto": on for the CPU backend). Raises ValueError naming it."""
  mode = cpu_mode(variable, modes)
  return mode == modes[2] or (mode == modes[0] and jax.default_backend() == "cpu")


# "auto" keeps XLA's weight gradient for 3x3-type stride-1 convs with C_in C_out below this
# (16-32 channels): there the per-tap slices cost more than XLA's transposes (module docstring).
MATMUL_MIN_CHANNEL_PRODUCT = 64 * 64


def use_matmul_weight_grad(kernel_shape: Sequence[int] | None = None,
                           strides: Sequence[int] = (1, 1)) -> bool:
  """Whether a traced convolution takes the matmul weight gradient (module docstring).

  "matmul"/"xla" force it on/off. "auto" needs the CPU backend and, given the HWIO
  `kernel_shape`, a conv where the matmul form pays: 1x1, strided, few output channels
  (C_out s^2 < C_in), or C_in C_out >= MATMUL_MIN_CHANNEL_PRODUCT.
  """
  mode = cpu_mode("MEDREP_CONV_WEIGHT_GRAD", MODES)
  if mode != "auto":
    return mode == "matmul"
  if jax.default_backend() != "cpu":
    return False
  if kernel_shape is None:
    return True
  kh, kw, c_in, c_out = (int(d) for d in kernel_shape)
  s = max(int(d) for d in strides)
  return (kh * kw == 1 or s > 1 or c_out * s * s < c_in
          or c_in * c_out >= MATMUL_MIN_CHANNEL_PRODUCT)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` with a matmul weight gradient for plain NHWC 2-D convs."""
  plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1
           and use_matmul_weight_grad(rhs.shape, window_strides) and batch_group_count == 1 and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision,
               preferred_element_type)


def _forward(x, w, strides, pads, precision, out_dtype):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, out_dtype):
  return _forward(x, w, strides, pads, precision, out_dtype)


def _conv_fwd(x, w, strides, pads, precision, out_dtype):
  return _forward(x, w, strides, pads, precision, out_dtype), (x, w)


def weight_grad(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
                strides: tuple[int, int], pads) -> jax.Array:
  """dW (kh, kw, C_in, C_out) of an NHWC convolution, one matrix product per kernel tap.

  Each tap's product needs one operand shifted to that tap. When C_out s^2 < C_in (few
  output channels, e.g. a 1-channel head) the output gradient is the one shifted: dy is
  scattered onto the padded input grid at (s y + i, s x + j) for every tap, and one
  (N', C_in)^T (N', kh kw C_out) product over the padded input gives all taps. Otherwise
  the activations are sliced per tap (module docstring). Same sums either way.
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  b, ho, wo, c_out = dy.shape
  c_in = x.shape[-1]
  if any(lo or hi for lo, hi in pads):
    x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  if c_out * sh * sw < c_in:
    return _weight_grad_shift_dy(x, dy, (kh, kw), (sh, sw))
  dy2 = dy.reshape(b * ho * wo, c_out)
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = lax.slice(x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c_in),
                     (1, sh, sw, 1))
      taps.append(lax.dot_general(xs.reshape(b * ho * wo, c_in), dy2, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, c_in, c_out)


def _weight_grad_shift_dy(x_pad: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
                          strides: tuple[int, int]) -> jax.Array:
  """``weight_grad`` with dy scattered per tap onto x_pad's grid (x_pad read once)."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  b, hp, wp, c_in = x_pad.shape
  _, ho, wo, c_out = dy.shape
  zero = jnp.zeros((), dy.dtype)
  taps = []
  for i in range(kh):
    for j in range(kw):
      # dy[y, x] lands at (s y + i, s x + j); the rest of the grid is 0.
      taps.append(lax.pad(dy, zero, ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                                     (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0))))
  d = jnp.concatenate(taps, -1).reshape(b * hp * wp, kh * kw * c_out)
  dw = lax.dot_general(x_pad.reshape(b * hp * wp, c_in), d, (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)         # (C_in, kh kw C_out)
  return dw.reshape(c_in, kh, kw, c_out).transpose(1, 2, 0, 3)


def _conv_bwd(strides, pads, precision, out_dtype, res, dy):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: _forward(x_, w, strides, pads, precision, out_dtype), x)
  (dx,) = input_vjp(dy)
  dw = weight_grad(x, dy.astype(x.dtype), w.shape[:2], strides, pads)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
