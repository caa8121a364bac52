"""The benchmark workloads, by name, in the order ``benchmarks.run`` runs them.

Each runner takes ``common.Options`` and returns table rows (dicts with
``workload``, ``point`` and the measured fields). Runners import lazily so a
``--only`` run pays only for its own imports.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

# name -> (module, runner attribute or (factory, argument), one-line description)
_REGISTRY: dict[str, tuple[str, Any, str]] = {
    "dcl_cstp": ("ssl", "run_dcl", "DCL-CsTP dual-stream step (+ torch A/B, augmentation cost)"),
    "dcl_cstp_bank": ("ssl", "run_bank", "DCL-CsTP step at K and 16 K bank keys, interleaved"),
    "dcl_cstp_sweep": ("ssl", "run_sweep", "DCL-CsTP step at other batch and image sizes"),
    "mocov2": ("ssl", ("baseline", "mocov2"), "MoCo-v2 preset step"),
    "simclr": ("ssl", ("baseline", "simclr"), "SimCLR preset step"),
    "simsiam": ("ssl", ("baseline", "simsiam"), "SimSiam preset step"),
    "ldm_unet": ("ldm", "run_unet", "LDM latent UNet train step (+ torch A/B)"),
    "vae": ("ldm", "run_vae", "LDM KL-VAE train step"),
    "ddim50": ("ldm", "run_ddim", "DDIM-50 sampling of the latent UNet"),
    "seg_finetune": ("segmentation", "run_seg", "U-Net segmentation fine-tuning step"),
    "drfl": ("drfl", "run_drfl", "DRFL dual-stream segmentation step (+ torch A/B)"),
    "ltdiff_ddpm": ("ltdiff", "run_ddpm",
                    "LTDiff++ latent DDPM step, Z_B given Z_A by concat (+ torch A/B)"),
    "radiomics": ("ltdiff", "run_radiomics", "LTDiff++ radiomic features per ROI (host NumPy)"),
    "dsdm_step": ("dsdm", "run_step",
                  "DSDM generator step: SPADE + MCAA UNet, hybrid loss, Adam, EMA (+ torch A/B)"),
    "dsdm_ddim": ("dsdm", "run_ddim",
                  "DSDM guided DDIM-50 sampling (s=3, cond + null in one call) (+ torch A/B, "
                  "sampler overhead)"),
}
NAMES = tuple(_REGISTRY)
# What ``--suite gpu`` runs without ``--only``: the figures issue 18 asks of a lent GPU
# (bf16 DCL-CsTP at 224 px with its bank guard, the LDM UNet at 64^2 latents, DDIM-50,
# the DRFL / LTDiff++ / DSDM steps at paper size, each step against bf16 eager and
# torch.compile), trimmed to fit one call of at most 8 minutes: compiles dominate it, so
# the run shares a compile cache, defaults to --deadline-s 450 and runs torch.compile last
# (docs/results/benchmarks.md, "GPU suite: dry run and time budget"). The other workloads,
# dsdm_ddim included, run with ``--only``.
GPU_SUITE = ("dcl_cstp", "dcl_cstp_bank", "ldm_unet", "ddim50", "drfl", "ltdiff_ddpm",
             "dsdm_step")


def suite_names(suite: str) -> tuple[str, ...]:
  """The workloads a suite runs by default, in order."""
  return GPU_SUITE if suite == "gpu" else NAMES


def describe(name: str) -> str:
  return _REGISTRY[name][2]


def runner(name: str) -> Callable[..., list[dict[str, Any]]]:
  """The runner of workload ``name``.

  Raises:
    KeyError: unknown name (the message lists the valid names).
  """
  if name not in _REGISTRY:
    raise KeyError(f"unknown workload {name!r}; valid: {', '.join(NAMES)}")
  module, attr, _ = _REGISTRY[name]
  mod = importlib.import_module(f"benchmarks.workloads.{module}")
  if isinstance(attr, tuple):
    return getattr(mod, attr[0])(attr[1])
  return getattr(mod, attr)
