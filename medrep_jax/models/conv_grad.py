"""Channels-last convolutions with gradients that are sums of matrix products (fast on XLA:CPU).

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
(`conv_general_dilated=`); cases it does not cover (other layouts, dilation, groups, 1-D,
negative padding) go to `lax.conv_general_dilated` unchanged.

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

3-D (NDHWC / DHWIO, the "_3d" ResNets) takes the same route with two CPU changes. XLA runs
the input gradient of a strided conv as an lhs-dilated convolution, which XLA:CPU does
through a slow generic path in 3-D (B16 16^3, 32 -> 64, 3x3x3 stride 2: forward 13 ms,
XLA's dx 712 ms). `input_grad_phase` splits it by phase: tap k = p + s m only reaches
padded-input positions s u + p, so one (N, C_out) x (C_out, taps C_in) product, shifted
sums per phase (lax.pad) and an interleave give dx with the forward's flop count. It is
taken for strided convs and for stems from <= PHASE_MAX_C_IN channels; stride-1 convs of
more channels keep XLA's dx, which was faster there. The per-tap weight gradient beat XLA's
on every 3-D conv measured, so "auto" uses it on all of them. Measured on a shared 2-core
machine under heavy load (absolute times about 7x an idle run; the ratios are the point),
B16 SAME f32, ms, XLA -> this module:
16^3 32->32 k3 s1 dx 556 (kept), dW 1072 -> 852; 32^3 16->16 k3 s1 dx 2777 (kept), dW
5183 -> 3396; 16^3 32->64 k3 s2 dx 6109 -> 31, dW 695 -> 80; 32^3 1->16 k3 s1 dx 1999 ->
264, dW 409 -> 148; 32^3 16->32 k1 s2 (projection) dx 1072 -> 105, dW 280 -> 2.
`MEDREP_CONV_WEIGHT_GRAD=xla` keeps XLA's dx and dW on 3-D convs too; `matmul` forces both
custom gradients (phase dx on stride-1 convs as well).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_NDHWC = ("NDHWC", "DHWIO", "NDHWC")
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


def _channels_last_rank(dimension_numbers) -> int:
  """2 for NHWC/HWIO, 3 for NDHWC/DHWIO dimension numbers, 0 for anything else."""
  if dimension_numbers is None:
    return 0
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    for n in (2, 3):
      lhs = (0, n + 1) + tuple(range(1, n + 1))
      if tuple(dimension_numbers) == (lhs, (n + 1, n) + tuple(range(n)), lhs):
        return n
    return 0
  return {_NHWC: 2, _NDHWC: 3}.get(tuple(dimension_numbers), 0)


def _is_nhwc(dimension_numbers) -> bool:
  return _channels_last_rank(dimension_numbers) == 2


def use_phase_input_grad(kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
  """Whether a traced 3-D convolution takes the phase-decomposed input gradient.

  "matmul"/"xla" force it on/off; "auto" takes it on the CPU backend for strided convs,
  whose XLA input gradient (an lhs-dilated convolution) is the slow one, and for convs
  from at most PHASE_MAX_C_IN channels (stems on 1-channel volumes); module docstring.
  """
  mode = cpu_mode("MEDREP_CONV_WEIGHT_GRAD", MODES)
  if mode != "auto":
    return mode == "matmul"
  return jax.default_backend() == "cpu" and (max(int(d) for d in strides) > 1
                                             or int(kernel_shape[-2]) <= PHASE_MAX_C_IN)


# "auto" also takes the phase input gradient of stride-1 3-D convs with C_in up to this.
PHASE_MAX_C_IN = 4


def use_matmul_weight_grad_3d(kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
  """`use_matmul_weight_grad` for DHWIO kernels: "auto" takes it on every CPU 3-D conv.

  Unlike 2-D, the per-tap form beat XLA's 3-D weight gradient on every conv measured
  (module docstring), so no shape rule; the arguments are kept for a future one.
  """
  del kernel_shape, strides
  mode = cpu_mode("MEDREP_CONV_WEIGHT_GRAD", MODES)
  if mode != "auto":
    return mode == "matmul"
  return jax.default_backend() == "cpu"


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` with a custom gradient for plain channels-last convs.

  2-D NHWC: matmul weight gradient where `use_matmul_weight_grad` says so. 3-D NDHWC:
  phase-decomposed input gradient (`use_phase_input_grad`) and/or matmul weight gradient
  (`use_matmul_weight_grad_3d`). Everything else is `lax.conv_general_dilated` unchanged.
  """
  rank = _channels_last_rank(dimension_numbers) if lhs.ndim in (4, 5) else 0
  simple = (rank == lhs.ndim - 2 and feature_group_count == 1 and batch_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1,) * rank))
            and all(d == 1 for d in (rhs_dilation or (1,) * rank)))
  dw_matmul = dx_phase = False
  if simple and rank == 2:
    dw_matmul = use_matmul_weight_grad(rhs.shape, window_strides)
  elif simple:
    dw_matmul = use_matmul_weight_grad_3d(rhs.shape, window_strides)
    dx_phase = use_phase_input_grad(rhs.shape, window_strides)
  if isinstance(padding, str) and (dw_matmul or dx_phase):
    padding = lax.padtype_to_pads(lhs.shape[1:1 + rank], rhs.shape[:rank], window_strides,
                                  padding)
  if not isinstance(padding, str) and any(int(p) < 0 for lh in padding for p in lh):
    dx_phase = dw_matmul = False  # negative (cropping) pads: not worth a custom path
  if not (dw_matmul or dx_phase):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision,
               preferred_element_type, dw_matmul, dx_phase)


def _forward(x, w, strides, pads, precision, out_dtype):
  dn = _NHWC if x.ndim == 4 else _NDHWC
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn,
                                  precision=precision, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv(x, w, strides, pads, precision, out_dtype, dw_matmul, dx_phase):
  return _forward(x, w, strides, pads, precision, out_dtype)


def _conv_fwd(x, w, strides, pads, precision, out_dtype, dw_matmul, dx_phase):
  return _forward(x, w, strides, pads, precision, out_dtype), (x, w)


def _taps(kernel: Sequence[int]):
  return itertools.product(*(range(k) for k in kernel))


def weight_grad(x: jax.Array, dy: jax.Array, kernel_hw: Sequence[int],
                strides: Sequence[int], pads) -> jax.Array:
  """dW (*kernel, C_in, C_out) of a channels-last convolution, one matrix product per tap.

  Each tap's product needs one operand shifted to that tap. When C_out prod(s) < C_in (few
  output channels, e.g. a 1-channel head) the output gradient is the one shifted: dy is
  scattered onto the padded input grid at (s y + i, s x + j) for every tap, and one
  (N', C_in)^T (N', taps C_out) product over the padded input gives all taps. Otherwise
  the activations are sliced per tap (module docstring). Same sums either way. Works for
  2-D (NHWC, kernel (kh, kw)) and 3-D (NDHWC, kernel (kd, kh, kw)).
  """
  kernel, strides = tuple(kernel_hw), tuple(strides)
  b, *out, c_out = dy.shape
  c_in = x.shape[-1]
  if any(lo or hi for lo, hi in pads):
    x = jnp.pad(x, ((0, 0),) + tuple(tuple(p) for p in pads) + ((0, 0),))
  if c_out * math.prod(strides) < c_in:
    return _weight_grad_shift_dy(x, dy, kernel, strides)
  n = b * math.prod(out)
  dy2 = dy.reshape(n, c_out)
  taps = []
  for tap in _taps(kernel):
    xs = lax.slice(x, (0, *tap, 0),
                   (b, *(t + s * (o - 1) + 1 for t, s, o in zip(tap, strides, out)), c_in),
                   (1, *strides, 1))
    taps.append(lax.dot_general(xs.reshape(n, c_in), dy2, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(*kernel, c_in, c_out)


def _weight_grad_shift_dy(x_pad: jax.Array, dy: jax.Array, kernel_hw: Sequence[int],
                          strides: Sequence[int]) -> jax.Array:
  """``weight_grad`` with dy scattered per tap onto x_pad's grid (x_pad read once)."""
  kernel = tuple(kernel_hw)
  b, *grid, c_in = x_pad.shape
  _, *out, c_out = dy.shape
  zero = jnp.zeros((), dy.dtype)
  taps = []
  for tap in _taps(kernel):
    # dy[y, x] lands at (s y + i, s x + j); the rest of the grid is 0.
    taps.append(lax.pad(dy, zero, ((0, 0, 0),) + tuple(
        (t, g - t - s * (o - 1) - 1, s - 1) for t, g, s, o in zip(tap, grid, strides, out))
        + ((0, 0, 0),)))
  k = math.prod(kernel)
  d = jnp.concatenate(taps, -1).reshape(b * math.prod(grid), k * c_out)
  dw = lax.dot_general(x_pad.reshape(b * math.prod(grid), c_in), d, (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)         # (C_in, taps C_out)
  dw = dw.reshape(c_in, *kernel, c_out)
  return jnp.moveaxis(dw, 0, -2)


def input_grad_phase(dy: jax.Array, w: jax.Array, in_shape: Sequence[int],
                     strides: Sequence[int], pads) -> jax.Array:
  """dx of a channels-last convolution without an lhs-dilated convolution.

  Tap k = p + s m of the kernel only reaches padded-input positions s u + p (phase p):
  dx_pad[s u + p] = sum_m dy[u - m] W[p + s m]^T. One (N, C_out) x (C_out, taps C_in)
  product gives every tap's dy W^T; each phase's grid (ceil(P / s) per axis) is the sum
  of its taps' products shifted by m (lax.pad), and the phases interleave into the padded
  input grid, from which the padding is cropped. Same sums as XLA's input gradient.
  """
  kernel, strides = tuple(w.shape[:-2]), tuple(strides)
  c_in, c_out = w.shape[-2:]
  b, *out, _ = dy.shape
  spatial = tuple(in_shape[1:-1])
  grid = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads))
  sub = tuple(-(-g // s) for g, s in zip(grid, strides))           # phase grid, ceil(P / s)
  z = lax.dot_general(dy.reshape(-1, c_out), w.reshape(-1, c_in, c_out),
                      (((1,), (2,)), ((), ())), preferred_element_type=jnp.float32)
  z = z.reshape(b, *out, math.prod(kernel), c_in)                  # (B, *out, taps, C_in)
  zero = jnp.zeros((), z.dtype)
  flat = {tap: t for t, tap in enumerate(_taps(kernel))}
  phases = []
  for phase in itertools.product(*(range(s) for s in strides)):
    acc = None
    ranges = [range(p, k, s) for p, k, s in zip(phase, kernel, strides)]
    for tap in itertools.product(*ranges):
      zt = z[..., flat[tap], :]
      shifted = lax.pad(zt, zero, ((0, 0, 0),) + tuple(
          (t // s, u - t // s - o, 0) for t, s, u, o in zip(tap, strides, sub, out))
          + ((0, 0, 0),))
      acc = shifted if acc is None else acc + shifted
    phases.append(jnp.zeros((b, *sub, c_in), z.dtype) if acc is None else acc)
  n = len(spatial)
  dx = jnp.stack(phases).reshape(*strides, b, *sub, c_in)
  # (s_1..s_n, B, u_1..u_n, C) -> (B, u_1, s_1, ..., u_n, s_n, C)
  perm = (n,) + tuple(a for d in range(n) for a in (n + 1 + d, d)) + (2 * n + 1,)
  dx = dx.transpose(perm).reshape(b, *(u * s for u, s in zip(sub, strides)), c_in)
  return lax.slice(dx, (0, *(lo for lo, _ in pads), 0),
                   (b, *(lo + m for (lo, _), m in zip(pads, spatial)), c_in))


def _conv_bwd(strides, pads, precision, out_dtype, dw_matmul, dx_phase, res, dy):
  x, w = res
  if dx_phase:
    dx = input_grad_phase(dy.astype(x.dtype), w.astype(x.dtype), x.shape, strides,
                          pads).astype(x.dtype)
  else:
    _, input_vjp = jax.vjp(lambda x_: _forward(x_, w, strides, pads, precision, out_dtype), x)
    (dx,) = input_vjp(dy)
  if dw_matmul:
    dw = weight_grad(x, dy.astype(x.dtype), w.shape[:-2], strides, pads)
  else:
    _, weight_vjp = jax.vjp(lambda w_: _forward(x, w_, strides, pads, precision, out_dtype), w)
    (dw,) = weight_vjp(dy)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
