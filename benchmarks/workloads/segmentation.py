"""U-Net segmentation fine-tuning: the ``finetune`` method's step with ``task=segmentation``.

A ResNet encoder with the U-Net decoder on its stages (skip connections),
IoU + BCE loss (eq. 9), AdamW, full fine-tuning. The method learns the number
of mask classes from its data source; the benchmark gives it a binary-mask
source description instead of a dataset.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from benchmarks import flops
from benchmarks.workloads.common import Options, measure_config, row
from medrep_jax import config_lib
from medrep_jax.data.sources import SourceInfo

SEG = {
    "quick": dict(encoder="resnet_tiny", tiny=True, image=32, batch=8),
    "cpu": dict(encoder="resnet18", tiny=False, image=96, batch=8),
    "gpu": dict(encoder="resnet50", tiny=False, image=256, batch=32),
}


def binary_masks(method: Any, channels: int = 3) -> None:
  """Tells the method its (absent) data: ``channels`` channels, binary masks."""
  method.info = SourceInfo(name="synthetic", num_classes=0, class_names=(), channels=channels,
                            has_mask=True, num_mask_classes=2)


def seg_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]) -> tuple[float, float]:
  x = batch["image"]
  variables = flops.abstract({"params": state.params, **state.model_state})
  apply = method.model.apply
  fwd = flops.count_flops(lambda v, x: apply(v, x, train=True, mutable=["batch_stats"]),
                          variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return fwd, 0.0


def seg_setup(opts: Options) -> tuple[Any, dict[str, np.ndarray]]:
  """(config, loader-shaped batch of images and binary masks) at the suite's size."""
  s = opts.size(SEG)
  finetune = config_lib.config_module("finetune", config_lib.CONFIG_DIR)
  c = finetune.finetune_config(task="segmentation", data="phantoms",
                               size="tiny" if s["tiny"] else "paper", encoder=s["encoder"])
  c.model.small_input = s["tiny"]
  return c, seg_batch(c, opts, s, channels=3)


def seg_batch(c: Any, opts: Options, s: Mapping[str, Any], channels: int
              ) -> dict[str, np.ndarray]:
  """Sets `c`'s size, batch and dtype for a timed step (1000 steps, no epochs) and returns
  a loader-shaped batch: images in [0, 1] and random binary masks."""
  c.data.image_size, c.data.channels = s["image"], channels
  c.train.update(batch_size=s["batch"], eval_batch_size=s["batch"], num_epochs=0.0,
                 num_steps=1000, progress=False)
  c.dtype = opts.compute_dtype
  rng = np.random.default_rng(opts.seed)
  b, px = s["batch"], s["image"]
  return {"image": rng.random((b, px, px, channels), np.float32),
          "mask": (rng.random((b, px, px)) > 0.5).astype(np.uint8),
          "index": np.arange(b, dtype=np.int32)}


def run_seg(opts: Options) -> list[dict[str, Any]]:
  c, batch = seg_setup(opts)
  rec = measure_config(c, batch, opts, analytic=seg_analytic, prepare=binary_masks)
  return [row("seg_finetune", f"{c.model.encoder} U-Net {c.data.image_size}px "
                              f"B{c.train.batch_size} {c.dtype}", rec)]
