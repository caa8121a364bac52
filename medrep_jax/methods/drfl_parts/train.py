"""DRFL stage `train`: the dual-stream network of Fig. 2 (or the plain U-Net baseline).

The segmentation stream gives p_bin (B, H, W, K), the SR stream p_sr (B, 2H, 2W, C) in
[0, 1], the Fusion Module p_fusion (B, H, W, K); the loss is eq. 7
(`losses.drfl.drfl_loss`). The SR target g_sr is the teacher's cached 2x output of each
training image (`sr_target="teacher"`, read from the `teacher` stage in `teacher_from`)
or the bicubic 2x upsample (`sr_target="bicubic"`, a control needing no teacher). Flips
and 90° rotations run on device, alike on image, mask and SR target. The final mask is
p_fusion (p_bin without the Fusion Module); evaluation reports Dice, IoU, HD95 and pixel
accuracy, plus the forward pass's GFLOPs per image.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax import methods
from medrep_jax.data import transforms as transforms_lib
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as metrics_lib
from medrep_jax.losses import drfl as drfl_losses
from medrep_jax.methods import base
from medrep_jax.methods.drfl_parts import common
from medrep_jax.models import drfl as drfl_model
from medrep_jax.models import unet

SR_TARGETS = ("teacher", "bicubic")


class UNetBaseline(nn.Module):
  """The plain U-Net of Tables 1-4 (Ronneberger et al.: max-pool encoder, transposed-conv
  decoder with skips) at `widths`; returns {"p_bin": logits} like `DRFL`."""
  num_classes: int
  widths: tuple[int, ...] = (64, 128, 256, 512, 512)
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    encoder = unet.UNetEncoder(widths=tuple(self.widths), norm=self.norm, dtype=self.dtype)
    net = unet.UNet(num_classes=self.num_classes, encoder=encoder,
                    decoder_widths=tuple(self.widths[-2::-1]), norm=self.norm,
                    upsample="transpose", dtype=self.dtype, name="unet")
    return {"p_bin": net(x, train)}


class DRFLStage(base.Method):
  """Trains `models.drfl.DRFL` (or `UNetBaseline`) with eq. 7."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    if config.sr_target not in SR_TARGETS:
      raise ValueError(f"sr_target={config.sr_target!r}; expected one of {SR_TARGETS}")
    self._gflops = None

  @property
  def num_outputs(self) -> int:
    k = int(self.info.num_mask_classes)
    return 1 if k <= 2 else k

  @property
  def sr_stream(self) -> bool:
    m = self.config.model
    return m.arch == "drfl" and bool(m.sr_stream)

  @functools.cached_property
  def model(self):
    m, dtype = self.config.model, jnp.dtype(self.config.dtype)
    if m.arch == "unet":
      return UNetBaseline(num_classes=self.num_outputs, widths=tuple(m.widths), norm=m.norm,
                          dtype=dtype)
    if m.arch != "drfl":
      raise ValueError(f"model.arch={m.arch!r}; expected drfl or unet")
    names = {f.name for f in dataclasses.fields(drfl_model.DRFL)} - {
        "num_classes", "dtype", "parent", "name"}
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
              for k, v in m.items() if k in names}
    return drfl_model.DRFL(**fields, num_classes=self.num_outputs, dtype=dtype)

  # ---- data: the train split gains "sr" when the targets come from the teacher
  def make_source(self, split: str):
    source = super().make_source(split)
    if not source.info.has_mask:
      raise ValueError(f"drfl needs masks, but data {source.info.name!r} has none; use an "
                       f"image+mask dataset")
    if split != "train" or not self.sr_stream or self.config.sr_target != "teacher":
      return source
    return common.WithTargets(source, self._teacher_targets(source))

  def abstract_batch(self, planned):
    """The generic batch; while the teacher stage (`teacher_from`) has not run yet, the
    data's own batch plus its "sr" targets described from the config (2x the image,
    float32), so the network is still traced on its image size before the teacher trains."""
    if self.shape_inputs_pending(planned) != ["teacher_from"]:
      return super().abstract_batch(planned)
    batch = self.batch_spec(super().make_source("train"))
    if self.sr_stream and self.config.sr_target == "teacher":
      b, h, w, c = batch["image"].shape
      batch["sr"] = jax.ShapeDtypeStruct((b, 2 * h, 2 * w, c), jnp.float32)
    return batch

  def _teacher_targets(self, source) -> np.ndarray:
    """The teacher's cached 2x targets; made here (from the finished teacher run) only
    when its cache is missing, and then cached in this workdir."""
    c = self.config
    if not c.teacher_from:
      raise ValueError("sr_target=teacher needs teacher_from: a finished `drfl` stage="
                       "teacher run (in the pipeline: 'stage:teacher'); or set "
                       "sr_target=bicubic")
    tfs, bs = super().transforms("train"), int(c.train.eval_batch_size)
    _, fps = common.map_source(lambda x: x[:, :1, :1], source, tfs, bs)
    size = (int(c.data.image_size),) * 2
    for path in (pathlib.Path(c.teacher_from) / common.CACHE_NAME,
                 pathlib.Path(self.workdir or ".") / common.CACHE_NAME):
      sr = common.load_targets(path, fps, size)
      if sr is not None:
        return sr
    trained = methods.load_trained(c.teacher_from, method="drfl", stage="teacher")
    fn = jax.jit(functools.partial(trained.stage.upscale, trained.variables))
    sr, fps = common.map_source(fn, source, tfs, bs)
    common.save_targets(pathlib.Path(self.workdir) / common.CACHE_NAME, sr, fps)
    return sr

  # ---- state and loss
  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"], train=False)

  def forward(self, variables, images, train: bool, rng=None):
    """Model outputs (a dict with p_bin, and p_sr / p_fusion when on) and new state."""
    mutable = [k for k in variables if k != "params"]
    rngs = {"dropout": rng} if rng is not None else {}
    if train:
      return self.model.apply(variables, images, train=True, rngs=rngs, mutable=mutable)
    return self.model.apply(variables, images, train=False), {}

  def loss_fn(self, params, state, batch, rng):
    k_aug, k_drop = jax.random.split(rng)
    if self.config.augment:
      batch = common.flip_rotate(k_aug, batch)
    outputs, updates = self.forward({"params": params, **state.model_state},
                                    batch["image"], True, k_drop)
    target = None
    if "p_sr" in outputs:
      target = batch["sr"] if "sr" in batch else common.bicubic_2x(batch["image"])
    l = self.config.loss
    loss, terms = drfl_losses.drfl_loss(outputs, batch["mask"], target, lam=float(l.lam),
                                        gamma=float(l.gamma), seg_weight=float(l.seg_weight))
    return loss, {"metrics": terms, "updates": updates}

  # ---- inference (the eval step and `medrep_jax.load(...).predict` share it)
  def predict(self, variables, images: jax.Array) -> dict[str, jax.Array]:
    """{"mask": (B, H, W) uint8, "probs"}: the final prediction p_fusion (p_bin when the
    Fusion Module is off), foreground probability (B, H, W) for one output channel."""
    outputs, _ = self.forward(variables, images, False)
    logits = outputs.get("p_fusion", outputs["p_bin"])
    if logits.shape[-1] == 1:
      prob = jax.nn.sigmoid(logits[..., 0].astype(jnp.float32))
      return {"mask": (prob > 0.5).astype(jnp.uint8), "probs": prob}
    return {"mask": jnp.argmax(logits, -1).astype(jnp.uint8),
            "probs": jax.nn.softmax(logits.astype(jnp.float32))}

  @property
  def predict_classes(self) -> tuple[str, ...]:
    if self.num_outputs == 1:
      return ("background", "foreground")
    return tuple(f"class_{k}" for k in range(self.num_outputs))

  def eval_step(self, state, batch):
    pred = self.predict(state.variables(), batch["image"])
    return {"index": batch["index"], "pred": pred["mask"],
            "mask": batch["mask"].astype(jnp.uint8)}

  # ---- host side
  def gflops(self, variables) -> float:
    """GFLOPs per image of the inference forward pass (every stream that is on)."""
    if self._gflops is None:
      size = int(self.config.data.image_size)
      apply = lambda v, x: self.forward(v, x, False)[0]
      self._gflops = common.gflops_per_image(apply, variables, (size, size, self.channels))
    return self._gflops

  def evaluate(self, outputs, state, ctx):
    pred, mask = outputs["pred"], outputs["mask"]
    # Dice, IoU (eq. 16-17), HD95 and pixel accuracy (eq. 18).
    metrics = metrics_lib.segmentation_metrics(pred, mask, max(2, self.info.num_mask_classes))
    metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    if not ctx.final:
      return base.Result(metrics)
    variables = jax.device_get(state.variables())
    metrics["gflops"] = self.gflops(variables)
    figs = {"segmentation overlays": self._overlay(outputs, ctx)}
    if self.sr_stream:
      figs["SR stream (input | target | p_sr)"] = self._sr_figure(outputs, variables, ctx)
    v = self.config.get("variant", "")
    lines = ["## Table 5-7 row", "", "| variant | Dice | IoU | ACC | GFLOPs |",
             "|---|---|---|---|---|",
             f"| {v} | {100 * metrics['dice']:.2f} | {100 * metrics['iou']:.2f} | "
             f"{100 * metrics['pixel_accuracy']:.2f} | {metrics['gflops']:.3g} |", "",
             "GFLOPs: XLA's count for one image's forward pass (a multiply-add counts 2)."]
    return base.Result(metrics, figs, lines)

  def _images(self, indices, split):
    source, tfs = self.make_source(split), self.transforms(split)
    return np.stack([transforms_lib.apply_transforms(source[int(i)], tfs)["image"]
                     for i in indices])

  def _overlay(self, outputs, ctx) -> str:
    n = min(8, len(outputs["index"]))
    path = fig_lib.segmentation_overlay_grid(
        self._images(outputs["index"][:n], ctx.split), outputs["mask"][:n],
        outputs["pred"][:n], ctx.figures_dir / "segmentation_overlays.png",
        title=f"step {ctx.step}: ground truth vs prediction")
    return os.path.relpath(path, ctx.workdir)

  def _sr_figure(self, outputs, variables, ctx) -> str:
    x = self._images(outputs["index"][:6], ctx.split)
    out = jax.jit(lambda v, a: self.forward(v, a, False)[0]["p_sr"])(variables, x)
    up = lambda a: np.asarray(jax.image.resize(a, (a.shape[0], *out.shape[1:]), "nearest"))
    target = np.asarray(common.bicubic_2x(jnp.asarray(x)))
    label = "bicubic 2x"
    if self.config.sr_target == "teacher" and self.config.teacher_from:
      trained = methods.load_trained(self.config.teacher_from, method="drfl", stage="teacher")
      target = np.asarray(jax.jit(trained.stage.upscale)(trained.variables, x))
      label = "teacher 2x"
    titles = [t for t in ("input", label, "p_sr") for _ in x]
    path = fig_lib.image_grid(np.concatenate([up(x), target, np.asarray(out)]),
                              ctx.figures_dir / "sr_stream.png", nrow=len(x), titles=titles)
    return os.path.relpath(path, ctx.workdir)
