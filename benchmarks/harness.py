"""Shared benchmark utilities: timing, compile cost, A/B rounds, device info, output.

Every timer blocks on its result (``jax.block_until_ready``; plus
``torch.cuda.synchronize`` when torch is using CUDA), so asynchronous dispatch
never hides work. Timings are reported as medians with p10/p90, because the
CI machines are shared and single samples are noisy. Nothing here asserts on
speed: benchmarks print tables and write JSON (DESIGN.md, conventions).

Torch is optional: this module never imports it (it only looks for an
already-imported ``torch`` in ``sys.modules``), so ``--no-torch`` runs work
with the ``[dev]`` extra alone.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def sync(result: Any = None) -> Any:
  """Waits for ``result`` (any pytree of JAX arrays) and any queued CUDA work."""
  jax.block_until_ready(result)
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
    torch.cuda.synchronize()
  return result


def _quantile(xs: Sequence[float], q: float) -> float:
  return float(np.quantile(np.asarray(xs, np.float64), q))


def summarize(times: Sequence[float]) -> dict[str, Any]:
  """{median_s, p10_s, p90_s, min_s, times} of per-call seconds."""
  times = [float(t) for t in times]
  return {"median_s": statistics.median(times), "p10_s": _quantile(times, 0.1),
          "p90_s": _quantile(times, 0.9), "min_s": min(times), "times": times}


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> dict[str, Any]:
  """Times ``fn()`` ``iters`` times after ``warmup`` untimed calls.

  Each call is timed on its own and blocks on its result (see ``sync``), so
  the times are wall-clock seconds of finished work.

  Args:
    fn: a callable with no arguments; close over state to thread it (e.g. a
      train step that replaces donated buffers).
    warmup: untimed calls first (compilation, caches, allocator).
    iters: timed calls (>= 1).

  Returns:
    ``summarize`` of the per-call times: median_s, p10_s, p90_s, min_s, times.
  """
  if iters < 1:
    raise ValueError(f"time_fn needs iters >= 1, got {iters}")
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return summarize(times)


class CompileResult(NamedTuple):
  """An ahead-of-time compiled executable, what it cost to build, and its lowering."""
  compiled: Any
  lower_s: float
  compile_s: float
  lowered: Any = None

  @property
  def total_s(self) -> float:
    return self.lower_s + self.compile_s


def compile_time(jitted: Any, *args: Any, **kwargs: Any) -> CompileResult:
  """Lowers and compiles ``jitted`` for these arguments, timing each phase.

  The returned ``compiled`` executable can be called with arguments of the
  same shapes (it honours the jit's donation), so timing it afterwards does
  not compile a second time.
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  mid = time.perf_counter()
  compiled = lowered.compile()
  return CompileResult(compiled, mid - start, time.perf_counter() - mid, lowered)


_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
                 "/jax/compilation_cache/cache_misses": "misses"}
_cache_counts = {"hits": 0, "misses": 0}
_cache_listening = False


def _count_cache_event(event: str, **_: Any) -> None:
  if event in _CACHE_EVENTS:
    _cache_counts[_CACHE_EVENTS[event]] += 1


def use_compile_cache(path: str | os.PathLike) -> None:
  """Shares compiled executables between the programs of this process (and later runs
  pointed at the same ``path``): JAX's persistent compilation cache, every program
  cached whatever its compile time or size. A program compiled again (the same HLO, e.g.
  ``dcl_cstp_bank``'s K program after ``dcl_cstp``'s) is then loaded, not compiled; on a
  GPU the cache also keeps XLA's autotuning results. Call before the first compile
  (JAX looks at the setting once); cache hits are counted from then on
  (``compile_cache_counts``)."""
  global _cache_listening
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if not _cache_listening:
    jax.monitoring.register_event_listener(_count_cache_event)
    _cache_listening = True


def compile_cache_counts() -> dict[str, int]:
  """Persistent compilation cache hits and misses so far (after ``use_compile_cache``)."""
  return dict(_cache_counts)


class TraceResult(NamedTuple):
  """A step traced (and lowered) for abstract arguments (nothing compiled or run)."""
  lowered: Any
  trace_s: float
  lower_s: float | None


def trace_time(jitted: Any, *args: Any, lower: bool = True) -> TraceResult:
  """Traces ``jitted`` for these (possibly ``jax.ShapeDtypeStruct``) arguments and, with
  ``lower``, lowers it, timing each phase; compiles nothing."""
  start = time.perf_counter()
  traced = jitted.trace(*args)
  if not lower:
    return TraceResult(None, time.perf_counter() - start, None)
  mid = time.perf_counter()
  lowered = traced.lower()
  return TraceResult(lowered, mid - start, time.perf_counter() - mid)


def _cost_entries(compiled: Any) -> list[Mapping[str, Any]]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Backend without cost model.
    return []
  if cost is None:
    return []
  if isinstance(cost, Mapping):
    return [cost]
  return [c for c in cost if isinstance(c, Mapping)]


def cost_flops(compiled: Any) -> float | None:
  """XLA's FLOP estimate of a compiled executable, or None when unavailable.

  ``cost_analysis()`` returns a dict in current JAX and a list with one dict
  per HLO module in older versions; the list entries are summed. A multiply-add
  counts as 2 FLOPs, so an (M, K) @ (K, N) matmul is 2 M N K.
  """
  flops = [float(c["flops"]) for c in _cost_entries(compiled)
           if c.get("flops") is not None]
  return sum(flops) if flops else None


_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                  "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes", "peak_memory_in_bytes")


def memory_bytes(compiled: Any) -> dict[str, int] | None:
  """The compiled program's buffer sizes from ``memory_analysis()``, or None.

  Returns the fields the backend fills (arguments, outputs, aliased/donated,
  temporaries, code, and peak where reported) plus ``total_bytes`` =
  arguments + outputs - aliased + temporaries, an upper bound of the live
  device memory of one call.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not implemented here.
    return None
  if stats is None:
    return None
  out = {f: int(getattr(stats, f)) for f in _MEMORY_FIELDS
         if isinstance(getattr(stats, f, None), (int, np.integer))}
  if not out:
    return None
  if all(f in out for f in _MEMORY_FIELDS[:4]):
    out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                          - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def interleave(fns: Mapping[str, Callable[[], Any]], rounds: int, *,
               iters: int | Mapping[str, int] = 1,
               warmup: int = 1) -> dict[str, list[float]]:
  """Times several callables in alternating rounds; per-round median seconds.

  Round r runs every function ``iters`` times, in the given order on even
  rounds and reversed on odd ones (ABBA), so slow drifts of a shared machine
  hit all of them alike. ``warmup`` untimed calls of each come first.

  Returns:
    {name: [median seconds of round 0, round 1, ...]}.
  """
  if rounds < 1:
    raise ValueError(f"interleave needs rounds >= 1, got {rounds}")
  names = list(fns)
  per = {n: iters if isinstance(iters, int) else iters[n] for n in names}
  for n in names:
    for _ in range(warmup):
      sync(fns[n]())
  medians: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
      medians[n].append(time_fn(fns[n], warmup=0, iters=per[n])["median_s"])
  return medians


def ratio_stats(ratios: Sequence[float]) -> dict[str, Any]:
  """{median, min, max, ratios} of per-round ratios."""
  ratios = [float(r) for r in ratios]
  return {"median": statistics.median(ratios), "min": min(ratios),
          "max": max(ratios), "ratios": ratios}


def ab_compare(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], rounds: int,
               *, iters: int = 1, warmup: int = 1) -> dict[str, Any]:
  """Alternating A/B rounds of a JAX and a torch callable.

  Returns:
    ``ratio_stats`` of torch_time / jax_time per round (> 1: JAX is faster),
    plus ``jax`` and ``torch``: ``summarize`` of their per-round medians.
  """
  med = interleave({"jax": jax_fn, "torch": torch_fn}, rounds, iters=iters,
                   warmup=warmup)
  out = ratio_stats([t / j for j, t in zip(med["jax"], med["torch"])])
  out["jax"], out["torch"] = summarize(med["jax"]), summarize(med["torch"])
  return out


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
  """Where the numbers came from: backend, devices, versions, CPU, load."""
  devices = jax.devices()
  info = {
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax_version": jax.__version__,
      "jaxlib_version": _version("jaxlib"),
      "flax_version": _version("flax"),
      "torch_version": _version("torch"),
      "python_version": platform.python_version(),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  if hasattr(os, "getloadavg"):
    info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
  return info


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (pathlib.Path, type)):
    return str(x)
  return repr(x)


def results_path(name: str) -> pathlib.Path:
  """``benchmarks/results/{name}-{UTC time}.json`` (that folder is gitignored)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  return RESULTS_DIR / f"{name}-{stamp}.json"


def write_json(record: Mapping[str, Any], path: str | os.PathLike | None = None, *,
               name: str = "bench") -> pathlib.Path:
  """Writes ``record`` as indented JSON; returns the path.

  Args:
    record: JSON-able mapping (numpy scalars and arrays are converted).
    path: the file to write; None for ``results_path(name)``. Parent folders are
      created.
    name: the file-name stem when ``path`` is None.
  """
  path = pathlib.Path(path if path is not None else results_path(name))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
  return path


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (float, np.floating)):
    if value == 0 or not math.isfinite(value):
      return str(value)
    if abs(value) >= 1e5 or abs(value) < 1e-3:
      return f"{value:.3e}"
    return f"{value:.4g}"
  return str(value)


def print_table(rows: Sequence[Mapping[str, Any]],
                columns: Sequence[str | tuple[str, str]], *,
                file: Any = None) -> str:
  """Prints rows as an aligned text table and returns it.

  Args:
    rows: one mapping per row; missing keys print as "-".
    columns: keys, or (key, header) pairs.
    file: stream (default stdout).
  """
  cols = [(c, c) if isinstance(c, str) else c for c in columns]
  cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  text = "\n".join(lines)
  print(text, file=file or sys.stdout, flush=True)
  return text
