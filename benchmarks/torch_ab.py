"""Side-by-side timing of a JAX step and PyTorch reference steps in one process.

Every A/B row has two PyTorch references (issue 18): the eager step and the same step
under ``torch.compile`` (inductor), the setup a performance-minded PyTorch user runs. On
CPU both run in float32 (inductor needs a working C++ compiler); on CUDA, and in the GPU
suite's ``--dry-run``, in bf16 autocast + channels-last. A row reports
``speedup_vs_torch_eager`` and ``speedup_vs_torch_compile`` (torch step / JAX step per
A/B round: median, min, max; > 1: JAX is faster) and ``speedup_vs_torch`` against the
faster of the two (``torch_setup``). A compiled setup that fails (no C++ compiler, an
inductor error) or is not run leaves ``speedup_vs_torch_compile`` None and says why in
``torch_notes``; it never fails the row. Rounds alternate JAX and torch (ABBA) so load
changes on a shared machine hit both.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax

from benchmarks import harness

# A factory: (amp, channels_last, compile) -> a no-argument callable running one torch step.
TorchFactory = Callable[[bool, bool, bool], Callable[[], Any]]
KINDS = ("eager", "compile")  # The two references: speedup_vs_torch_<kind>.


def torch_or_none():
  """The torch module, or None without the ``[bench]`` extra."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return torch


def device() -> str:
  torch = torch_or_none()
  return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def setups(torch_compile: bool = True, *, gpu: bool | None = None,
           kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
  """The torch setups to compare against: eager, then ``torch.compile`` when asked.

  ``gpu``: the GPU setups (bf16 autocast + channels-last) rather than float32; None = on
  CUDA only (True builds them on CPU too, as the GPU suite's dry run does). ``kinds``:
  the kinds to keep (``("compile",)``: the compiled setup alone, run later than eager).
  """
  gpu = device() == "cuda" if gpu is None else gpu
  settings = dict(amp=gpu, channels_last=gpu)
  suffix = "_bf16_channels_last" if gpu else ""
  out = [dict(name=f"eager{suffix}", kind="eager", compile=False, **settings)]
  if torch_compile:
    out.append(dict(name=f"compiled{suffix}", kind="compile", compile=True, **settings))
  return [s for s in out if s["kind"] in kinds]


def autocast_module(module: Any) -> Any:
  """Wraps a torch module so its forward runs under bf16 autocast (float32 out)."""
  torch = torch_or_none()

  class Autocast(torch.nn.Module):
    """bf16 autocast around ``inner``'s forward."""

    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, *args):
      with torch.autocast(device(), dtype=torch.bfloat16):
        return self.inner(*args).float()

  return Autocast(module)


def set_threads(step: Callable[[], Any], spec: str) -> tuple[int | None, dict[str, Any]]:
  """Sets torch's intra-op threads: an int, or "auto" (probe 1 and all cores, keep the
  faster; OpenMP barriers crawl when a loaded machine deschedules a thread)."""
  torch = torch_or_none()
  if torch is None:
    return None, {}
  if device() == "cuda":
    return torch.get_num_threads(), {}
  if spec != "auto":
    torch.set_num_threads(int(spec))
    return int(spec), {}
  from benchmarks.diffusion import pick_threads  # pylint: disable=import-outside-toplevel
  return pick_threads(step, sorted({1, torch.get_num_threads()}), probe_steps=1)


def build(factory: Callable[..., Callable[[], Any]], setup: Mapping[str, Any], **kwargs: Any
          ) -> tuple[Callable[[], Any], float]:
  """(step, seconds of its first calls): the step of ``setup`` called once, or twice when
  compiled (``torch.compile`` may recompile on call 2), so compilation is not timed."""
  step = factory(setup["amp"], setup["channels_last"], setup["compile"], **kwargs)
  start = time.perf_counter()
  for _ in range(2 if setup["compile"] else 1):
    harness.sync(step())
  return step, time.perf_counter() - start


def error_text(e: BaseException, limit: int = 300) -> str:
  """``Type: message`` on one line, at most ``limit`` characters."""
  return " ".join(f"{type(e).__name__}: {e}".split())[:limit]


def failed(setup: Mapping[str, Any], e: BaseException, out: dict[str, Any]) -> None:
  """Records a failed compiled setup in ``out`` (raises ``e`` again for an eager one: the
  reference itself is broken, and the row must fail)."""
  if setup["kind"] == "eager":
    raise e
  out["torch"][setup["name"]] = {**settings(setup), "error": error_text(e)}
  out["torch_notes"].append(f"torch.compile failed: {error_text(e, 200)}")


def settings(setup: Mapping[str, Any]) -> dict[str, Any]:
  return {k: setup[k] for k in ("kind", "amp", "channels_last", "compile")}


def setup_record(setup: Mapping[str, Any], timing: Mapping[str, Any], batch: int,
                 first_s: float | None, threads: int | None,
                 probe: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The ``torch[<setup>]`` entry of a row: settings, step time, examples/s, first calls."""
  return {**settings(setup), "device": device(), "step_s": timing["median_s"],
          "examples_per_sec": batch / timing["median_s"], "first_calls_s": first_s,
          "times": timing["times"], "threads": threads, "thread_probe_s": dict(probe or {})}


def ratio_fields(measured: Sequence[tuple[Mapping[str, Any], dict[str, Any]]],
                 torch_records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """``speedup_vs_torch_<kind>`` for both kinds (None when not measured), and
  ``speedup_vs_torch`` / ``torch_setup`` against the faster measured setup (lower median
  torch step time)."""
  out: dict[str, Any] = {f"speedup_vs_torch_{k}": None for k in KINDS}
  for s, ratio in measured:
    out[f"speedup_vs_torch_{s['kind']}"] = ratio
  if measured:
    s, ratio = min(measured, key=lambda m: torch_records[m[0]["name"]]["step_s"])
    out["speedup_vs_torch"], out["torch_setup"] = ratio, s["name"]
  return out


def compare(jax_fn: Callable[[], Any], factory: TorchFactory, *, batch: int, rounds: int,
            iters: int, threads: str = "auto", torch_compile: bool = True,
            gpu: bool | None = None, notes: Sequence[str] = (), kinds: Sequence[str] = KINDS
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """A/B rounds of ``jax_fn`` against each torch setup (``setups(torch_compile, gpu=gpu,
  kinds=kinds)``).

  Returns:
    (JAX timing of the first comparison, record fields: ``torch`` {setup: timing and
    settings, or ``error``}, ``ratio_fields``, and ``torch_notes``: ``notes`` plus a line
    per failed compiled setup).
  """
  out: dict[str, Any] = {"torch": {}, "torch_notes": list(notes)}
  measured, jax_timing, n_threads = [], None, None
  for s in setups(torch_compile, gpu=gpu, kinds=kinds):
    try:
      step, first_s = build(factory, s)
      probe: dict[str, Any] = {}
      if n_threads is None:
        n_threads, probe = set_threads(step, threads)
      with jax.transfer_guard("disallow"):
        ab = harness.ab_compare(jax_fn, step, rounds, iters=iters, warmup=0)
    except Exception as e:  # pylint: disable=broad-except  # Reported in the row.
      failed(s, e, out)
      continue
    jax_part, torch_part = ab.pop("jax"), ab.pop("torch")
    jax_timing = jax_timing or jax_part
    out["torch"][s["name"]] = setup_record(s, torch_part, batch, first_s, n_threads, probe)
    measured.append((s, ab))
  out.update(ratio_fields(measured, out["torch"]))
  return jax_timing, out


def merge(row: dict[str, Any], fields: Mapping[str, Any]) -> None:
  """Adds the fields of later A/B rounds (a deferred compiled setup) to ``row``: its
  ``torch`` setups, notes and ``speedup_vs_torch_<kind>``, and ``speedup_vs_torch`` /
  ``torch_setup`` against the faster of all the row's measured setups."""
  row.setdefault("torch", {}).update(fields.get("torch", {}))
  notes = row.setdefault("torch_notes", [])
  notes += [n for n in fields.get("torch_notes", []) if n not in notes]
  for k in KINDS:
    if fields.get(f"speedup_vs_torch_{k}") is not None:
      row[f"speedup_vs_torch_{k}"] = fields[f"speedup_vs_torch_{k}"]
  timed = [(name, rec) for name, rec in row["torch"].items()
           if "step_s" in rec and row.get(f"speedup_vs_torch_{rec['kind']}")]
  if timed:
    name, rec = min(timed, key=lambda t: t[1]["step_s"])
    row["speedup_vs_torch"], row["torch_setup"] = row[f"speedup_vs_torch_{rec['kind']}"], name


def iters_per_round(step_s: float, budget_s: float, rounds: int) -> int:
  """Calls per A/B round so that the JAX half of all rounds takes about ``budget_s``."""
  return max(1, min(20, int(budget_s / max(rounds * step_s, 1e-9))))


def summary(ratio: Mapping[str, Any] | None) -> str | None:
  """'0.56 (0.51-0.60)': the median and min-max of a ``speedup_vs_torch*`` field."""
  if not ratio:
    return None
  return f"{ratio['median']:.3g} ({ratio['min']:.3g}-{ratio['max']:.3g})"
