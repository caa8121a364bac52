"""DRFL train step: the ``drfl`` method's stage ``train`` (Xu et al., EAAI 2023).

The full network of Fig. 2 (``variant=drfl``, ``recipe=paper``): shared encoder with PFAM
blocks, segmentation and SR decoders, RFTM, SR head and Fusion Module; loss eq. 7 (BCE +
Dice on p_bin and p_fusion, L1 on p_sr, λ = γ = 1), Adam. The step flips and rotates
image and mask on device and computes the bicubic 2x SR target itself
(``sr_target=bicubic``, what a run without a teacher uses; a teacher's cached targets
would arrive in the batch as ``"sr"`` instead). A/B rounds against
``benchmarks.torch_ref.drfl`` (the same network, loaded with the JAX step's weights)
when torch is installed.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from benchmarks import flops, torch_ab
from benchmarks.workloads import segmentation
from benchmarks.workloads.common import Options, measure_config, row, torch_compare
from medrep_jax import config_lib

# size: configs/drfl.py SIZES entry; image: pixels (grayscale, as the paper's CT slices).
DRFL = {
    "quick": dict(size="tiny", image=32, batch=4),
    "cpu": dict(size="small", image=64, batch=16),
    "gpu": dict(size="paper", image=256, batch=8),
}


def binary_masks(method: Any) -> None:
  """Tells the method its (absent) data: one channel, binary masks (p_bin has K = 1)."""
  segmentation.binary_masks(method, channels=1)


def drfl_setup(opts: Options) -> tuple[Any, dict[str, np.ndarray]]:
  """(config, loader-shaped batch: images in [0, 1] and binary masks) at the suite's size."""
  s = opts.size(DRFL)
  drfl = config_lib.config_module("drfl", config_lib.CONFIG_DIR)
  c = drfl.drfl_config(variant="drfl", size=s["size"], recipe="paper", sr_target="bicubic")
  return c, segmentation.seg_batch(c, opts, s, channels=1)


def drfl_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]
                  ) -> tuple[float, float]:
  """Conv + matmul FLOPs of the trained forward (every stream, dropout on)."""
  x = batch["image"]
  variables = flops.abstract({"params": state.params, **state.model_state})
  apply = lambda v, x, r: method.model.apply(v, x, train=True, rngs={"dropout": r},
                                             mutable=["batch_stats"])
  fwd = flops.count_flops(apply, variables, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          jax.random.key(0))
  return fwd, 0.0


def drfl_factory(config: Any, batch: Mapping[str, np.ndarray],
                 variables: Mapping[str, Any]) -> torch_ab.TorchFactory:
  """Torch DRFL steps (``torch_ref.drfl.DRFLTrainStep``) starting from ``variables``."""

  def make(amp: bool, channels_last: bool, compile_: bool):
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks.torch_ref import drfl as ref  # pylint: disable=import-outside-toplevel
    dev = torch_ab.device()
    model = ref.drfl_from_config(config, in_channels=batch["image"].shape[-1])
    ref.load_flax(model, variables["params"], variables.get("batch_stats"))
    step = ref.DRFLTrainStep(model.to(dev), config, amp=amp, channels_last=channels_last,
                             compile=compile_)
    x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
    mask = torch.from_numpy(batch["mask"]).to(dev)
    return lambda: step(x, mask)

  return make


def run_drfl(opts: Options) -> list[dict[str, Any]]:
  s = opts.size(DRFL)
  c, batch = drfl_setup(opts)
  compare = torch_compare(opts, lambda bench, record: drfl_factory(
      c, batch, jax.device_get({"params": bench.state.params, **bench.state.model_state})))
  rec = measure_config(c, batch, opts, analytic=drfl_analytic, prepare=binary_masks,
                       compare=compare)
  return [row("drfl", f"DRFL {s['size']} {s['image']}px B{s['batch']} {c.dtype}", rec)]
