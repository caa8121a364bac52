"""LTDiff++ stage `ae` (phase 1, Sec. III-A/C): the UNet++ encoder-decoder on all slices.

Every slice of both kernels (`data.BothKernels`: A and B of each pair as two images) is
reconstructed through every deep-supervision head: L = sum_j w_j * l(head_j, x)
(Sec. III-A3; `losses.unetpp.deep_supervision_loss`, `loss.kind` l1 or l2, `loss.
head_weights` w_j, () = 1/n each). Values are HU windowed to [0, 1] (`ltdiff_parts.data`).
The step is `base.gradient_step` on `loss_fn` (one jit, batch sharded on "data"; BatchNorm
statistics are over the global batch, so the sharded step equals the one-device step), and
the UNet++ computes in `config.dtype`.

Evaluation, on `train.eval_split`: L1 and PSNR (data range 1) of the deepest head
X_(0,d-1) clipped to [0, 1], the same L1 in HU (`mae_hu`), L1 per kernel and per head;
at the end a figure of input | reconstruction for a few slices of both kernels.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.data import transforms as transforms_lib
from medrep_jax.eval import figures as fig_lib
from medrep_jax.losses import unetpp as unetpp_losses
from medrep_jax.methods import base
from medrep_jax.eval.metrics import psnr
from medrep_jax.methods.ltdiff_parts import common
from medrep_jax.methods.ltdiff_parts import data as data_lib

KERNEL_NAMES = ("A", "B")


class AEStage(base.Method):
  """Trains `UNetPlusPlus` to reconstruct CT slices of both kernels (phase 1)."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    common.check_model(config)
    self.head_weights = common.head_weights(config)
    data_lib.window(config.data)  # an HU window is required

  @functools.cached_property
  def model(self):
    return common.build_unetpp(self.config)

  @property
  def info(self):
    return data_lib.slice_info(self.config.data)

  # ---- data: both kernels' slices of the split's pairs
  def make_source(self, split: str):
    pairs = data_lib.pair_source(self.config.data, split,
                                 progress=bool(self.config.train.progress))
    return data_lib.BothKernels(pairs, self.info)

  def transforms(self, split: str) -> list:
    del split  # the pair source already resizes, windows and scales
    return [transforms_lib.CheckShapes(int(self.config.data.image_size), common.CHANNELS)]

  # ---- the step
  @staticmethod
  def target(batch):
    """What the heads reconstruct: the input itself (the `direct` stage: B)."""
    return batch["image"]

  def loss_fn(self, params, state, batch, rng):
    del rng  # deterministic: no dropout, no augmentation
    heads, updates = self.model.apply({"params": params, **state.model_state}, batch["image"],
                                      train=True, mutable=["batch_stats"])
    loss, terms = unetpp_losses.deep_supervision_loss(heads, self.target(batch),
                                                      self.head_weights,
                                                      kind=self.config.loss.kind)
    return loss, {"metrics": terms, "updates": updates}

  def reconstruct(self, variables, images: jax.Array) -> jax.Array:
    """The deepest head's reconstruction in [0, 1] (inference mode)."""
    heads = self.model.apply(variables, images, train=False)
    return common.to_image(self.config, common.deepest(heads))

  def eval_step(self, state, batch):
    x = self.target(batch)
    heads = self.model.apply(state.variables(), batch["image"], train=False)
    heads = [common.to_image(self.config, h)
             for h in (heads if isinstance(heads, list) else [heads])]
    per_example = lambda h: jnp.mean(jnp.abs(h - x), axis=(1, 2, 3))
    out = {f"l1_head{j}": per_example(h) for j, h in enumerate(heads, 1)}
    rec = heads[-1]
    return {**out, "l1": per_example(rec), "psnr": psnr(x, rec), "index": batch["index"],
            **{k: batch[k] for k in ("kernel",) if k in batch}}

  # ---- host side
  def scores(self, outputs) -> dict:
    """Mean L1, PSNR, L1 in HU, per head (and per kernel) of the gathered eval outputs."""
    _, width = data_lib.window(self.config.data)
    metrics = {"l1": float(np.mean(outputs["l1"])), "psnr": float(np.mean(outputs["psnr"])),
               "mae_hu": float(np.mean(outputs["l1"])) * width}
    for k, name in enumerate(KERNEL_NAMES if "kernel" in outputs else ()):
      mine = outputs["kernel"] == k
      if mine.any():
        metrics[f"l1_{name.lower()}"] = float(np.mean(outputs["l1"][mine]))
    metrics.update({k: float(np.mean(v)) for k, v in outputs.items()
                    if k.startswith("l1_head")})
    return metrics

  def evaluate(self, outputs, state, ctx):
    metrics = self.scores(outputs)
    if not ctx.final:
      return base.Result(metrics)
    figs = {"reconstructions (input | deepest head)": self._figure(state, ctx)}
    level, width = data_lib.window(self.config.data)
    lines = [f"Slices of both kernels (A: non-standard, B: standard), HU clipped to "
             f"[{level - width / 2:g}, {level + width / 2:g}] and scaled to [0, 1]; "
             f"`mae_hu` = L1 x {width:g} HU. Metrics are of the deepest head X_(0,"
             f"{len(self.config.model.widths) - 1}) on the {ctx.split} split."]
    return base.Result(metrics, figs, lines)

  def _figure(self, state, ctx) -> str:
    source, tfs = self.make_source(ctx.split), self.transforms(ctx.split)
    n = min(int(self.config.eval.figure_slices), len(source))
    records = [transforms_lib.apply_transforms(source[i], tfs) for i in range(n)]
    x = np.stack([r["image"] for r in records])
    rec = np.asarray(jax.jit(self.reconstruct)(jax.device_get(state.variables()), x))
    titles = [f"input {KERNEL_NAMES[int(r['kernel'])]}" for r in records]
    path = fig_lib.image_grid(np.concatenate([x, rec]), ctx.figures_dir / "reconstructions.png",
                              nrow=n, titles=titles + ["reconstruction"] * n)
    return os.path.relpath(path, ctx.workdir)
