"""CAMContrast stage 1: the normal/abnormal classifier that becomes the heatmap generator.

Sec. 3.1, eq. 1-4: an encoder + GAP + linear layer (normal = 0, abnormal = 1) trained with
L = mean(L_ce + λ·L_attn), λ = 0.01, where L_attn (eq. 4) uses the min-max-normalized CAMs
of eq. 1 and acts only on normal images predicted normal. Dataset labels become coarse
labels on device (`coarse.normal_class`: every other class is abnormal); multi-hot labels
train a K-way sigmoid classifier (Sec. 4.6) with BCE and the multi-label L_attn.
Standard augmentations (Sec. 4.1) run on device when `augment.policy` is not "none".

Evaluation: accuracy / AUC of the coarse task and, at the end, a figure of CAM heatmaps.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medrep_jax.data import augment
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as metrics_lib
from medrep_jax.losses import cam as cam_losses
from medrep_jax.methods import base
from medrep_jax.methods.camcontrast_parts import common, heatmaps
from medrep_jax.models import cam, unet


class ClassifierStage(base.Method):
  """CE + λ·L_attn on coarse labels (eq. 2)."""

  def make_source(self, split: str):
    source = super().make_source(split)
    if not source.info.num_classes:
      raise ValueError(f"camcontrast stage=classifier needs labels, but data "
                       f"{source.info.name!r} has none")
    return source

  @property
  def multi_label(self) -> bool:
    return bool(self.info.multi_label)

  @functools.cached_property
  def model(self) -> unet.Classifier:
    k = self.info.num_classes if self.multi_label else 2
    return unet.Classifier(num_classes=k, encoder=common.encoder_of(self.config))

  def _labels(self, batch):
    return common.coarse_labels(batch["label"], int(self.config.coarse.normal_class))

  def loss(self, logits, fmap, kernel, labels):
    """Per-example (L_ce, L_attn) of eq. 2-4."""
    norm_cams = cam.minmax_normalize(cam.class_activation_maps(fmap, kernel))
    if self.multi_label:
      targets = labels.astype(jnp.float32)
      ce = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
      attn = cam_losses.attention_loss_multilabel(norm_cams, jax.nn.sigmoid(logits), targets)
    else:
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      attn = cam_losses.attention_loss(norm_cams, jax.nn.softmax(logits), labels)
    return ce, attn

  def train_step(self, state, batch, rng):
    c = self.config
    x = batch["image"]
    if c.augment.policy != "none":
      x = augment.augment_batch(c.augment.policy, rng, x, indices=batch["index"])
    labels = self._labels(batch)

    def loss_fn(params):
      (logits, feats), updates = self.model.apply(
          {"params": params, **state.model_state}, x, True, True, mutable=["batch_stats"])
      ce, attn = self.loss(logits, unet.last_feature_map(feats), params["head"]["kernel"],
                           labels)
      if self.multi_label:
        acc = jnp.mean((logits > 0) == (labels > 0))
      else:
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
      metrics = {"loss/ce": jnp.mean(ce), "loss/attn": jnp.mean(attn),
                 "attn_active": jnp.mean(attn > 0), "accuracy": acc}
      loss = jnp.mean(ce + float(c.loss.attention_weight) * attn)
      return loss, {"metrics": metrics, "updates": updates}

    state, metrics, _ = base.gradient_step(state, loss_fn)
    return state, metrics

  # ---- inference (the eval step and `medrep_jax.load(...).predict` share it)
  def predict(self, variables, images: jax.Array) -> dict[str, jax.Array]:
    """{"probs": (B, 2)} coarse normal/abnormal softmax, or (B, K) sigmoid (multi-label)."""
    logits = self.model.apply(variables, images, False)
    return {"probs": jax.nn.sigmoid(logits) if self.multi_label else jax.nn.softmax(logits)}

  @property
  def predict_classes(self) -> tuple[str, ...]:
    return super().predict_classes if self.multi_label else common.CLASS_NAMES

  def eval_step(self, state, batch):
    probs = self.predict(state.variables(), batch["image"])["probs"]
    return {"probs": probs, "label": self._labels(batch), "index": batch["index"]}

  def evaluate(self, outputs, state, ctx):
    probs, labels = outputs["probs"], outputs["label"]
    if self.multi_label:
      out = {"auc": metrics_lib.multilabel_auc(probs, labels)}
    else:
      m = metrics_lib.classification_metrics(probs, labels, 2)
      out = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
    figs = {}
    if ctx.final:
      figs["CAM heatmaps"] = self._cam_figure(state, ctx)
    return base.Result(out, figs)

  def _cam_figure(self, state, ctx) -> str:
    source = self.make_source(ctx.split)
    fn = common.map_fn(self.model.encoder)
    got = common.collect_maps(fn, state.variables(), source, self.transforms(ctx.split),
                              batch_size=int(self.config.train.eval_batch_size),
                              limit=int(self.config.train.max_eval_examples))
    coarse = common.coarse_labels(got["label"], int(self.config.coarse.normal_class))
    rows = pick_examples(coarse)
    hm = heatmaps.make_heatmaps(got["maps"][rows], coarse[rows], got["image"][rows],
                                heatmaps.options_from_config(self.config.heatmap))
    titles = column_titles(coarse[rows], got["logits"][rows])
    if got["image"].ndim == 5:  # volumes: 3 views through the CAM's peak (Sec. 4.7)
      path = fig_lib.volume_views_figure(
          got["image"][rows], hm["raw"], ctx.figures_dir / "cam_heatmaps.png", at="peak",
          names=titles, title=f"stage-1 classifier, step {ctx.step}: CAM (min-max)")
    else:
      path = fig_lib.heatmap_overlay_grid(
          got["image"][rows], {"CAM (min-max)": hm["raw"], "suppressed": hm["heatmap"]},
          ctx.figures_dir / "cam_heatmaps.png", titles=titles,
          title=f"stage-1 classifier, step {ctx.step}")
    return os.path.relpath(path, ctx.workdir)


def pick_examples(coarse: np.ndarray, per_class: int = 4) -> np.ndarray:
  """Up to `per_class` normal rows, then up to `per_class` abnormal rows."""
  normal = np.flatnonzero(heatmaps.is_normal(coarse))[:per_class]
  abnormal = np.flatnonzero(~heatmaps.is_normal(coarse))[:per_class]
  return np.concatenate([normal, abnormal]).astype(np.int64)


def column_titles(coarse: np.ndarray, logits: np.ndarray) -> list[str]:
  """"normal p_abn=0.07" titles: the coarse class and the predicted abnormal probability."""
  logits = np.asarray(logits, np.float64)
  if logits.shape[-1] == 2:  # softmax probability of class 1
    p = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))
  else:  # multi-label: the largest sigmoid probability
    p = 1.0 / (1.0 + np.exp(-logits.max(-1)))
  names = ["normal" if n else "abnormal" for n in heatmaps.is_normal(coarse)]
  return [f"{name} p_abn={q:.2f}" for name, q in zip(names, p)]
