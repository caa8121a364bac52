"""Regression guards for compiled train steps (issue 6): checks that mean something on CPU.

* ``count_traces``: how often a method's ``train_step`` was traced (a
  recompile retraces; the step must be traced once).
* ``donation_warnings``: records JAX's "donated buffers were not usable"
  warnings while lowering/compiling; ``undonated``: the leaves of a state
  that a step call did not consume (donated buffers are deleted after the
  call, so a leaf that is still alive was not donated).
* ``matmul_dtypes``: per-dtype FLOPs of the convolutions and matmuls in the
  lowered StableHLO (the program handed to XLA), for the bf16 guard.
* ``compiled_matmul_dtypes``: the same from a compiled HLO module's text
  (convolutions, dots and cuDNN/cuBLAS custom calls), as a report.
* ``flat_ratio``: the K-sweep check, from interleaved round times.
"""
from __future__ import annotations

import contextlib
import math
import re
import statistics
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax

DONATION_WARNING = "donated buffers were not usable"


def count_traces(method: Any) -> dict[str, int]:
  """Wraps ``method.train_step`` (an instance attribute) to count its traces.

  Call before the step is jitted; returns a dict whose ``"traces"`` grows by
  one each time JAX traces the step.
  """
  counter = {"traces": 0}
  original = method.train_step

  def train_step(*args, **kwargs):
    counter["traces"] += 1  # Python runs only while tracing.
    return original(*args, **kwargs)

  method.train_step = train_step
  return counter


@contextlib.contextmanager
def donation_warnings() -> Iterator[list[str]]:
  """Collects the messages of "donated buffers were not usable" warnings."""
  found: list[str] = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    yield found
  for w in caught:
    if DONATION_WARNING in str(w.message):
      found.append(str(w.message).splitlines()[0])
    else:  # Not ours: pass it on.
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def undonated(tree: Any) -> list[str]:
  """Paths of the ``jax.Array`` leaves of ``tree`` that are not deleted."""
  alive = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
      alive.append(jax.tree_util.keystr(path))
  return alive


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree``."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


# ------------------------------------------------------------------ dtypes in HLO

_TENSOR = r"tensor<([^>]*)>"
_STABLEHLO_OP = re.compile(
    r"stablehlo\.(convolution|dot_general)\b(.*?):\s*\(" + _TENSOR + r",\s*" + _TENSOR
    + r"\)\s*->\s*" + _TENSOR)
_DIMS = re.compile(r"dim_numbers = \[([^\]]*)\]x\[([^\]]*)\]->")
_CONTRACT = re.compile(r"contracting_dims = \[([^\]]*)\] x")


def _tensor(spec: str) -> tuple[list[int], str]:
  *dims, dtype = spec.split("x")
  return [int(d) for d in dims], dtype


def _op_flops(kind: str, attrs: str, lhs: list[int], rhs: list[int], out: list[int]) -> float:
  if kind == "dot_general":
    m = _CONTRACT.search(attrs)
    dims = [int(d) for d in m.group(1).split(",") if d.strip()] if m else []
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims)
  m = _DIMS.search(attrs)
  spec = [s.strip() for s in m.group(2).split(",")] if m else []
  out_feat = rhs[spec.index("o")] if "o" in spec else rhs[-1]
  return 2.0 * math.prod(out) * math.prod(rhs) / out_feat


def matmul_dtypes(stablehlo_text: str) -> dict[str, Any]:
  """FLOPs of convolutions and dot_generals by operand dtype, from StableHLO text.

  Returns:
    {"convolution": {dtype: flops}, "dot_general": {dtype: flops}, "count": n,
    "f32_ops": [(kind, lhs shape, rhs shape), ...], "bf16_fraction": x}
    where dtype joins the two operand types ("bf16", or "f32" when both are
    f32, "bf16*f32" when mixed) and bf16_fraction is the FLOP share of ops
    whose operands are both bf16.
  """
  out: dict[str, Any] = {"convolution": {}, "dot_general": {}, "count": 0, "f32_ops": []}
  total = bf16 = 0.0
  for m in _STABLEHLO_OP.finditer(stablehlo_text):
    kind, attrs = m.group(1), m.group(2)
    (lhs, lt), (rhs, rt), (res, _) = (_tensor(m.group(i)) for i in (3, 4, 5))
    flops = _op_flops(kind, attrs, lhs, rhs, res)
    key = lt if lt == rt else f"{lt}*{rt}"
    out[kind][key] = out[kind].get(key, 0.0) + flops
    out["count"] += 1
    total += flops
    if key == "bf16":
      bf16 += flops
    else:
      out["f32_ops"].append((kind, lhs, rhs))
  out["bf16_fraction"] = bf16 / total if total else None
  return out


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([\w-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def parse_hlo(text: str) -> tuple[dict[str, tuple[str, str, str]], dict[str, list[str]]]:
  """Instructions and computations of an HLO module's text.

  Returns:
    ({name: (result type, opcode, line)}, {computation name: [instruction names]}).
    HLO instruction names are unique in a module, fused computations included.
  """
  instrs: dict[str, tuple[str, str, str]] = {}
  comps: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m:
      instrs[m.group(1)] = (m.group(2), m.group(3), line)
      comps.setdefault(current, []).append(m.group(1))
  return instrs, comps


def _dtype(result_type: str) -> str:
  return result_type.split("[", 1)[0].lstrip("(")


def compiled_matmul_dtypes(hlo_text: str) -> dict[str, int]:
  """Counts the convolutions and matmuls of compiled HLO text by operand dtypes.

  Counts ``convolution`` and ``dot`` instructions (inside fusions too, e.g.
  XLA:CPU's YNNPACK fusions or Triton gemm fusions) and custom calls whose
  target names a conv or gemm (cuDNN, cuBLAS). Operand types are looked up
  from their defining instructions.

  Returns:
    {"<kind>:<lhs dtype>*<rhs dtype>": count}.
  """
  instrs, _ = parse_hlo(hlo_text)
  counts: dict[str, int] = {}
  for _, opcode, line in instrs.values():
    kind = opcode
    if opcode == "custom-call":
      target = _TARGET.search(line)
      name = target.group(1).lower() if target else ""
      kind = "conv" if "conv" in name else "gemm" if ("gemm" in name or "matmul" in name) else ""
    elif opcode not in ("convolution", "dot"):
      kind = ""
    if not kind:
      continue
    operands = re.findall(r"%([\w.-]+)", line.split(" = ", 1)[1].split("),", 1)[0])[:2]
    types = [_dtype(instrs[o][0]) if o in instrs else "?" for o in operands]
    key = f"{kind}:{'*'.join(types)}"
    counts[key] = counts.get(key, 0) + 1
  return counts


def flat_ratio(base_times: Sequence[float], big_times: Sequence[float]) -> dict[str, float]:
  """Step-time ratio big/base from interleaved rounds: median of per-round ratios
  and the ratio of the fastest rounds (load only adds time)."""
  ratios = [b / a for a, b in zip(base_times, big_times)]
  return {"median": statistics.median(ratios),
          "min_over_min": min(big_times) / min(base_times)}


def check(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
  """One guard result row: {"check", "ok", "detail"} (ok None = not applicable)."""
  return {"check": name, "ok": ok, "detail": detail}


def failed(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The results whose ``ok`` is False."""
  return [r for r in results if r.get("ok") is False]
