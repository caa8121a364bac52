"""Side-by-side timing of a JAX step and PyTorch reference steps in one process.

The PyTorch setups: on CPU eager fp32 (``torch.compile`` only when asked; it
takes minutes to compile on 2 cores); on CUDA the strong setup the issue asks
for, bf16 autocast + channels-last, eager and ``torch.compile``d, so the
reported ``speedup_vs_torch`` is against the strongest one. Rounds alternate
JAX and torch (ABBA) so load changes on a shared machine hit both.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax

from benchmarks import harness

# A factory: (amp, channels_last, compile) -> a no-argument callable running one torch step.
TorchFactory = Callable[[bool, bool, bool], Callable[[], Any]]


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


def setups(torch_compile: bool | None) -> list[dict[str, Any]]:
  """The torch setups to compare against, weakest first.

  ``torch_compile``: None = on CUDA only, True = also on CPU, False = never.
  """
  if device() == "cuda":
    out = [dict(name="eager_bf16_channels_last", amp=True, channels_last=True, compile=False)]
    if torch_compile is not False:
      out.append(dict(name="compiled_bf16_channels_last", amp=True, channels_last=True,
                      compile=True))
    return out
  out = [dict(name="eager", amp=False, channels_last=False, compile=False)]
  if torch_compile:
    out.append(dict(name="compiled", amp=False, channels_last=False, compile=True))
  return out


def autocast_module(module: Any) -> Any:
  """Wraps a torch module so its forward runs under CUDA bf16 autocast (float32 out)."""
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
  if device() == "cuda":
    return torch.get_num_threads(), {}
  if spec != "auto":
    torch.set_num_threads(int(spec))
    return int(spec), {}
  from benchmarks.diffusion import pick_threads  # pylint: disable=import-outside-toplevel
  return pick_threads(step, sorted({1, torch.get_num_threads()}), probe_steps=1)


def compare(jax_fn: Callable[[], Any], factory: TorchFactory, *, batch: int, rounds: int,
            iters: int, threads: str = "auto", torch_compile: bool | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """A/B rounds of ``jax_fn`` against each torch setup.

  Returns:
    (JAX timing of the first comparison, record fields: ``torch`` {setup:
    timing and settings}, ``speedup_vs_torch`` against the last (strongest)
    setup and ``speedup_vs_torch_<setup>`` for each).
  """
  out: dict[str, Any] = {"torch": {}}
  jax_timing = None
  for i, s in enumerate(setups(torch_compile)):
    step = factory(s["amp"], s["channels_last"], s["compile"])
    start = time.perf_counter()
    for _ in range(2 if s["compile"] else 1):  # torch.compile may recompile on call 2.
      harness.sync(step())
    first_s = time.perf_counter() - start
    n_threads, probe = set_threads(step, threads) if i == 0 else (None, {})
    with jax.transfer_guard("disallow"):
      ab = harness.ab_compare(jax_fn, step, rounds, iters=iters, warmup=0)
    jax_part, torch_part = ab.pop("jax"), ab.pop("torch")
    jax_timing = jax_timing or jax_part
    out["torch"][s["name"]] = {
        **{k: s[k] for k in ("amp", "channels_last", "compile")},
        "device": device(), "step_s": torch_part["median_s"],
        "examples_per_sec": batch / torch_part["median_s"], "first_calls_s": first_s,
        "times": torch_part["times"], "threads": n_threads, "thread_probe_s": probe}
    out[f"speedup_vs_torch_{s['name']}"] = ab
    out["speedup_vs_torch"] = ab
    out["torch_setup"] = s["name"]
  return jax_timing, out


def iters_per_round(step_s: float, budget_s: float, rounds: int) -> int:
  """Calls per A/B round so that the JAX half of all rounds takes about ``budget_s``."""
  return max(1, min(20, int(budget_s / max(rounds * step_s, 1e-9))))


def summary(fields: Mapping[str, Any]) -> str:
  """'0.56 (0.51-0.60) vs eager' for the table."""
  sp = fields.get("speedup_vs_torch")
  if not sp:
    return "-"
  return f"{sp['median']:.3g} ({sp['min']:.3g}-{sp['max']:.3g}) vs {fields['torch_setup']}"
