"""Downstream fine-tuning: classification (eq. 8) and U-Net segmentation (eq. 9).

Section III-E (Stage 3) of the dual-stream contrastive paper: a linear head on the
pretrained encoder trained with BCE (eq. 8), and a U-Net decoder on the encoder's stages
with skip connections trained with IoU + BCE (eq. 9). The encoder can be frozen (linear
probe / frozen-encoder segmentation) or fully fine-tuned, a label fraction of the train
split can be used, and `init_from` loads any pretraining run's `encoder` subtree.

Config fields (see `medrep_jax/presets/finetune.py`): `task`, `model.encoder`,
`model.norm`, `model.small_input`, `model.decoder_widths`, `freeze_encoder`,
`label_fraction`, `loss`.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.data import subsets
from medrep_jax.data import transforms
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as metrics_lib
from medrep_jax.losses import segmentation as seg_losses
from medrep_jax.methods import base
from medrep_jax.models import unet
from medrep_jax.train import optim
from medrep_jax.train.state import TrainState

TASKS = ("classification", "segmentation")


class FinetuneNet(nn.Module):
  """Encoder (named `encoder`) + linear head or U-Net decoder."""
  task: str
  num_outputs: int
  encoder: nn.Module
  decoder_widths: Sequence[int] = (256, 128, 64, 32, 16)
  norm: str = "batch"
  train_encoder: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    feats = self.encoder(x, train=train and self.train_encoder)
    if not self.train_encoder:
      feats = jax.lax.stop_gradient(feats)
    if self.task == "classification":
      pooled = feats["pooled"].astype(jnp.float32)
      return nn.Dense(self.num_outputs, dtype=jnp.float32, name="head")(pooled)
    return unet.UNetDecoder(self.decoder_widths, self.num_outputs, self.norm,
                            dtype=self.dtype, name="decoder")(
                                feats, train, output_size=x.shape[1:3])


def _frozen_labels(params) -> Any:
  return {k: jax.tree.map(lambda _: "frozen" if k == "encoder" else "train", v)
          for k, v in params.items()}


class Finetune(base.Method):
  """Supervised classification or segmentation on top of an encoder."""

  def __init__(self, config):
    super().__init__(config)
    if config.task not in TASKS:
      raise ValueError(f"task={config.task!r}; expected one of {TASKS}")
    self.task = config.task
    self.dtype = jnp.dtype(config.dtype)
    self._info = None
    self._built = None

  # ---- data
  def make_source(self, split: str):
    source = super().make_source(split)
    self._info = source.info
    if self.task == "segmentation" and not source.info.has_mask:
      raise ValueError(f"task=segmentation needs masks, but data {source.info.name!r} has "
                       f"none; use an image+mask dataset")
    if self.task == "classification" and not source.info.num_classes:
      raise ValueError(f"task=classification needs labels, but data {source.info.name!r} "
                       f"has none")
    frac = float(self.config.label_fraction)
    if split == "train" and frac < 1.0:
      source = subsets.label_fraction(source, frac, seed=int(self.config.seed))
    return source

  @property
  def num_outputs(self) -> int:
    info = self._info
    if self.task == "classification":
      return info.num_classes
    return 1 if info.num_mask_classes <= 2 else info.num_mask_classes

  def model(self) -> FinetuneNet:
    m = self.config.model
    encoder = unet.encoder_from_config(m, self.dtype, self.config.get("remat", False))
    return FinetuneNet(task=self.task, num_outputs=self.num_outputs, encoder=encoder,
                       decoder_widths=tuple(m.decoder_widths), norm=m.norm,
                       train_encoder=not self.config.freeze_encoder, dtype=self.dtype)

  # ---- state
  def init_state(self, rng, batch):
    # The model and optimizer are built once: the state's static fields must compare
    # equal between eval_shape and jit.
    if self._built is None:
      model = self.model()
      tx, _ = optim.make_optimizer(self.config.optim, int(self.config.train.num_steps))
      if self.config.freeze_encoder:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: _frozen_labels(params))
      self._built = (model, tx)
    model, tx = self._built
    variables = model.init({"params": rng}, batch["image"], train=False)
    params = variables.pop("params")
    return TrainState.create(params=params, tx=tx, apply_fn=model.apply,
                             model_state=dict(variables))

  # ---- losses
  def loss(self, logits: jax.Array, batch) -> tuple[jax.Array, dict]:
    if self.task == "classification":
      labels = batch["label"]
      if labels.ndim == 2:  # multi-label multi-hot
        targets = labels.astype(jnp.float32)
      else:
        targets = jax.nn.one_hot(labels, logits.shape[-1])
      if self.config.loss == "bce":  # eq. 8, one-vs-rest for K > 2
        loss = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()
      elif self.config.loss == "ce":
        loss = optax.softmax_cross_entropy(logits, targets).mean()
      else:
        raise ValueError(f"loss={self.config.loss!r}; classification takes bce or ce")
      acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
      return loss, {"accuracy": acc}
    mask = batch["mask"]
    if self.config.loss == "iou_bce":  # eq. 9 (softmax CE in place of BCE when K > 1)
      loss = seg_losses.iou_bce_loss(logits, mask)
    elif self.config.loss == "dice_ce":
      loss = seg_losses.dice_ce_loss(logits, mask)
    else:
      raise ValueError(f"loss={self.config.loss!r}; segmentation takes iou_bce or dice_ce")
    pred = logits[..., 0] > 0 if logits.shape[-1] == 1 else jnp.argmax(logits, -1)
    fg = mask > 0
    inter = jnp.sum((pred > 0) & fg)
    dice = 2 * inter / jnp.maximum(jnp.sum(pred > 0) + jnp.sum(fg), 1)
    return loss, {"dice_fg": dice}

  def train_step(self, state: TrainState, batch, rng):
    del rng  # no stochastic layers; augmentations happen in the input pipeline

    def loss_fn(params):
      logits, updates = state.apply_fn({"params": params, **state.model_state},
                                       batch["image"], train=True, mutable=["batch_stats"])
      loss, aux = self.loss(logits, batch)
      return loss, (aux, updates)

    (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    model_state = {**state.model_state, **updates}
    state = state.apply_gradients(grads, model_state=model_state)
    return state, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}

  def eval_step(self, state: TrainState, batch):
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    out = {"index": batch["index"]}
    if self.task == "classification":
      if self.config.loss == "bce":
        probs = jax.nn.sigmoid(logits)
      else:
        probs = jax.nn.softmax(logits)
      out.update(probs=probs, label=batch["label"])
    else:
      if logits.shape[-1] == 1:
        prob = jax.nn.sigmoid(logits[..., 0])
        out.update(pred=(prob > 0.5).astype(jnp.uint8), prob=prob.astype(jnp.float16))
      else:
        out.update(pred=jnp.argmax(logits, -1).astype(jnp.uint8))
      out["mask"] = batch["mask"].astype(jnp.uint8)
    return out

  # ---- host side
  def evaluate(self, outputs, state, ctx):
    info = self._info
    if self.task == "classification":
      probs, labels = outputs["probs"], outputs["label"]
      if labels.ndim == 2:
        return {"auc": metrics_lib.multilabel_auc(probs, labels)}, {}
      if self.config.loss == "bce":
        probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-12)
      metrics = metrics_lib.classification_metrics(probs, labels, info.num_classes)
      cm = metrics.pop("confusion_matrix", None)
      figs = {}
      if ctx.final and cm is not None:
        path = fig_lib.confusion_matrix_figure(np.asarray(cm), info.class_names,
                                               ctx.figures_dir / "confusion_matrix.png")
        figs["confusion matrix"] = os.path.relpath(path, ctx.workdir)
      return _scalars(metrics), figs
    num_classes = max(2, info.num_mask_classes)
    metrics = metrics_lib.segmentation_metrics(outputs["pred"], outputs["mask"], num_classes)
    if "prob" in outputs:
      metrics["ece_pixel"] = metrics_lib.ece(outputs["prob"].astype(np.float32),
                                             (outputs["mask"] > 0).astype(np.int64))
    figs = {}
    if ctx.final:
      figs["segmentation overlays"] = self._overlay(outputs, ctx)
    return _scalars(metrics), figs

  def _overlay(self, outputs, ctx) -> str:
    n = min(8, len(outputs["index"]))
    source = self.make_source(ctx.split)
    tfs = self.transforms(False)
    images = [transforms.apply_transforms(source[int(i)], tfs)["image"]
              for i in outputs["index"][:n]]
    path = fig_lib.segmentation_overlay_grid(np.stack(images), outputs["mask"][:n],
                                             outputs["pred"][:n],
                                             ctx.figures_dir / "segmentation_overlays.png",
                                             title=f"step {ctx.step}: ground truth vs "
                                                   f"prediction")
    return os.path.relpath(path, ctx.workdir)


def _scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def build(config) -> Finetune:
  return Finetune(config)
