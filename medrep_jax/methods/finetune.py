"""Downstream fine-tuning: classification (eq. 8) and U-Net segmentation (eq. 9).

Section III-E (Stage 3) of the dual-stream contrastive paper: a linear head on the
pretrained encoder trained with BCE (eq. 8), and a U-Net decoder on the encoder's stages
with skip connections trained with IoU + BCE (eq. 9). The encoder can be frozen (linear
probe / frozen-encoder segmentation) or fully fine-tuned, a label fraction of the train
split can be used, and `init_from` loads any pretraining run's `encoder` subtree.

Training augmentation (`augment`, CAMContrast Table 2): a random resized crop
(`crop_scale`, `crop_ratio`), a horizontal flip (`flip_p`) and a rotation in
[-`rotate_degrees`, `rotate_degrees`], on device inside the step, the segmentation mask
(and a field-of-view `roi`) moving with the image (`data.augment.downstream_augment`).
The defaults are the identity and leave the step as it was (no augmentation).

Config fields (see `configs/finetune.py`): `task`, `model.encoder`,
`model.norm`, `model.small_input`, `model.decoder_widths`, `freeze_encoder`,
`label_fraction`, `loss`, `augment`.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.config_lib import ConfigError
from medrep_jax.data import augment
from medrep_jax.data import subsets
from medrep_jax.data import transforms
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as metrics_lib
from medrep_jax.losses import segmentation as seg_losses
from medrep_jax.methods import base
from medrep_jax.models import unet

TASKS = ("classification", "segmentation")


def _frozen_labels(params) -> dict:
  return {k: jax.tree.map(lambda _: "frozen" if k == "encoder" else "train", v)
          for k, v in params.items()}


class Finetune(base.Method):
  """Supervised classification or segmentation on top of an encoder."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    if config.task not in TASKS:
      raise ValueError(f"task={config.task!r}; expected one of {TASKS}")
    self.task = config.task
    self.dtype = jnp.dtype(config.dtype)
    # CAMContrast Table 2's downstream augmentation; None = off (the identity defaults).
    self.augment_kwargs = augment.downstream_kwargs(config.get("augment"))
    normalize = str(config.data.get("normalize", "unit"))
    if self.augment_kwargs is not None and normalize != "unit":
      raise ConfigError(f"augment (crop, flip, rotation) works on images in [0, 1]; "
                        f"data.normalize={normalize!r} gives other values. Use "
                        f"data.normalize='unit' or leave augment at its identity defaults")

  # ---- data
  def make_source(self, split: str):
    source = super().make_source(split)
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
    if self.task == "classification":
      return self.info.num_classes
    return 1 if self.info.num_mask_classes <= 2 else self.info.num_mask_classes

  @functools.cached_property
  def model(self) -> nn.Module:
    """Encoder + linear head (classification) or + U-Net decoder (segmentation)."""
    m = self.config.model
    encoder = unet.encoder_from_config(m, self.dtype, self.config.get("remat", False))
    train_encoder = not self.config.freeze_encoder
    if self.task == "classification":
      return unet.Classifier(num_classes=self.num_outputs, encoder=encoder,
                             train_encoder=train_encoder,
                             head_norm=bool(m.get("head_norm", False)))
    return unet.UNet(num_classes=self.num_outputs, encoder=encoder,
                     decoder_widths=tuple(m.decoder_widths), norm=m.norm, dtype=self.dtype,
                     train_encoder=train_encoder)

  @functools.cached_property
  def tx(self):
    tx = super().tx
    if self.config.freeze_encoder:
      tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda params: _frozen_labels(params))
    return tx

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

  def augment(self, rng, batch):
    """The `augment` config's crop, flip and rotation (CAMContrast Table 2) of every
    example, keyed by its dataset index; a mask and an roi move with the image."""
    if batch["image"].ndim == 5:  # volumes: the same crop, flip and rotation in 3-D
      return {**batch, "image": self.augment_volumes(rng, batch)}
    classes = {}
    if self.task == "segmentation":
      classes = {"mask": max(2, int(self.info.num_mask_classes)), "roi": 2}
      classes = {k: n for k, n in classes.items() if k in batch}
    images, moved = augment.augment_labelled_batch(
        rng, batch["image"], {k: batch[k] for k in classes}, label_classes=classes,
        indices=batch["index"], **self.augment_kwargs)
    return {**batch, "image": images.astype(batch["image"].dtype), **moved}

  def augment_volumes(self, rng, batch) -> jax.Array:
    """The `augment` crop, flip and rotation on volumes (B, D, H, W, C): a 3-D resized crop,
    a left-right flip and one in-plane rotation of every slice (`standard3d` without
    intensity jitter; CAMContrast Sec. 4.7 keeps the 2-D protocol on volumes)."""
    if self.task != "classification":
      raise ConfigError("augment (crop, flip, rotation) on volumes is built for "
                        "task=classification only; leave augment at its identity defaults "
                        "for 3-D segmentation")
    kw = self.augment_kwargs
    images = augment.augment_batch(
        "standard3d", rng, batch["image"], indices=batch["index"], scale=kw["scale"],
        ratio=kw["ratio"], flip_p=kw["flip_p"], degrees=kw["degrees"], fill=kw["fill"],
        jitter_p=0.0)
    return images.astype(batch["image"].dtype)

  def loss_fn(self, params, state, batch, rng):
    # no stochastic layers; the rng only drives the optional training augmentation
    if self.augment_kwargs is not None:
      batch = self.augment(rng, batch)
    logits, updates = self.model.apply({"params": params, **state.model_state},
                                       batch["image"], train=True, mutable=["batch_stats"])
    loss, metrics = self.loss(logits, batch)
    return loss, {"metrics": metrics, "updates": updates}

  # ---- inference (the eval step and `medrep_jax.load(...).predict` share it)
  def predict(self, variables, images: jax.Array) -> dict[str, jax.Array]:
    """Classification: {"probs": (B, K)}, sigmoid for BCE (eq. 8), softmax for CE.

    Segmentation: {"mask": (B, H, W) uint8, "probs": foreground probability (B, H, W)
    for one output channel, or class probabilities (B, H, W, K)}, at the input size.
    """
    logits = self.model.apply(variables, images, train=False)
    if self.task == "classification":
      if self.config.loss == "bce":
        return {"probs": jax.nn.sigmoid(logits)}
      return {"probs": jax.nn.softmax(logits)}
    if logits.shape[-1] == 1:
      prob = jax.nn.sigmoid(logits[..., 0])
      return {"mask": (prob > 0.5).astype(jnp.uint8), "probs": prob}
    return {"mask": jnp.argmax(logits, -1).astype(jnp.uint8),
            "probs": jax.nn.softmax(logits)}

  @property
  def predict_classes(self) -> tuple[str, ...]:
    if self.task == "classification":
      return super().predict_classes
    if self.num_outputs == 1:
      return ("background", "foreground")
    return tuple(f"class_{k}" for k in range(self.num_outputs))

  def eval_step(self, state, batch):
    pred = self.predict(state.variables(), batch["image"])
    out = {"index": batch["index"]}
    if self.task == "classification":
      out.update(probs=pred["probs"], label=batch["label"])
    else:
      out["pred"] = pred["mask"]
      if pred["probs"].ndim == 3:  # one output channel: keep the foreground probability
        out["prob"] = pred["probs"].astype(jnp.float16)
      out["mask"] = batch["mask"].astype(jnp.uint8)
      if "roi" in batch:  # a field-of-view mask (data.roi_mask): score only inside it
        out["roi"] = batch["roi"].astype(jnp.uint8)
    return out

  # ---- host side
  def evaluate(self, outputs, state, ctx):
    info = self.info
    if self.task == "classification":
      probs, labels = outputs["probs"], outputs["label"]
      if labels.ndim == 2:
        return base.Result({"auc": metrics_lib.multilabel_auc(probs, labels)})
      if self.config.loss == "bce":
        probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-12)
      metrics = metrics_lib.classification_metrics(probs, labels, info.num_classes)
      cm = metrics.pop("confusion_matrix", None)
      figs = {}
      if ctx.final and cm is not None:
        path = fig_lib.confusion_matrix_figure(np.asarray(cm), info.class_names,
                                               ctx.figures_dir / "confusion_matrix.png")
        figs["confusion matrix"] = os.path.relpath(path, ctx.workdir)
      return base.Result(_scalars(metrics), figs)
    num_classes = max(2, info.num_mask_classes)
    roi = outputs.get("roi")  # present when the data has region masks (data.roi_mask)
    metrics = metrics_lib.segmentation_metrics(outputs["pred"], outputs["mask"], num_classes,
                                               valid=roi)
    if "prob" in outputs:
      inside = np.ones(outputs["mask"].shape, bool) if roi is None else roi > 0
      metrics["ece_pixel"] = metrics_lib.ece(outputs["prob"][inside].astype(np.float32),
                                             (outputs["mask"][inside] > 0).astype(np.int64))
    figs = {}
    if ctx.final:
      figs["segmentation overlays"] = self._overlay(outputs, ctx)
    return base.Result(_scalars(metrics), figs)

  def _overlay(self, outputs, ctx) -> str:
    n = min(8, len(outputs["index"]))
    source = self.make_source(ctx.split)
    tfs = self.transforms(ctx.split)
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


STAGES = {"finetune": Finetune}
