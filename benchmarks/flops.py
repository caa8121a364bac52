"""Model FLOPs counted from layer shapes, a measured matmul peak, and MFU.

``count_flops(fn, *args)`` traces ``fn`` to a jaxpr (no compilation, no
device work; ``args`` may be ``jax.ShapeDtypeStruct``) and adds up the
multiply-adds of every convolution and matmul, 2 FLOPs each: a conv costs
2 x out elements x kernel taps x input channels per group (over the input
dilation for a transposed conv: the inserted zeros are no work), a ``dot_general``
2 x out elements x contracted size. Sub-jaxprs (jit, remat, custom
derivatives) are walked and ``scan`` bodies are multiplied by their length.
Element-wise ops, norms and softmaxes are not counted: this is the "model
FLOPs" convention of MFU (ResNet-50 at 224 px: 4.1 GMAC = 8.2 GFLOP).

A training step costs about 3x the forward of the differentiated part
(forward, input gradient, weight gradient) plus 1x every no-grad forward
(e.g. a momentum encoder): ``train_step_flops``.

``measure_peak`` times a large square matmul in the given dtype; MFU is model
FLOPs per second over that measured peak (not a datasheet number).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import numpy as np


def _conv_flops(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, spatial...)
  taps_times_cin = math.prod(rhs) / rhs[rhs_spec[0]]
  # A transposed conv is a conv over the input dilated with zeros (lhs_dilation s): only
  # 1 / prod(s) of the taps meet an input pixel, so the work is that of the sub-pixel form.
  zeros = math.prod(eqn.params.get("lhs_dilation") or (1,))
  return 2.0 * math.prod(out) * taps_times_cin / zeros


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  contracted = math.prod(lhs[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def jaxpr_flops(jaxpr) -> float:
  """Conv + matmul FLOPs of a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name in ("cond", "switch"):
      total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
    else:
      times = eqn.params.get("length", 1) if name == "scan" else 1
      total += times * sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """Conv + matmul FLOPs of one call of ``fn(*args, **kwargs)`` (traced, not run)."""
  return jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args))


def train_step_flops(trained_forward: float, no_grad_forward: float = 0.0) -> float:
  """The analytic step cost: 3 x differentiated forward + 1 x no-grad forward."""
  return 3.0 * trained_forward + no_grad_forward


def measure_peak(dtype: str = "float32", n: int | None = None, iters: int = 3) -> dict[str, Any]:
  """Best-of-``iters`` FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` on device 0.

  Defaults: n = 8192 on accelerators, 2048 on CPU (about 17 GFLOP, a second or
  two on a laptop core).
  """
  platform = jax.devices()[0].platform
  n = n or (8192 if platform != "cpu" else 2048)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return {"dtype": str(np.dtype(dtype)), "n": n, "seconds": best,
          "flops_per_sec": 2.0 * n ** 3 / best, "platform": platform}


def mfu(model_flops_per_step: float | None, step_s: float,
        peak_flops_per_sec: float | None) -> float | None:
  """Model FLOPs utilization: (model FLOPs / step time) / measured peak."""
  if not model_flops_per_step or not peak_flops_per_sec or step_s <= 0:
    return None
  return model_flops_per_step / step_s / peak_flops_per_sec


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves for the array leaves of ``tree`` (for tracing)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
