"""DSDM stage `seg`: segmentation from diffusion features (paper 004, Sec. IV-C2, Fig. 4).

The segmentation network is the DSDM U-Net with GroupNorm in place of SPADE (no MCAA),
initialized from the DSDM's EMA weights: every array whose path and shape match is
copied, and `init_from.txt` lists what was loaded, what is new and what of the DSDM was
not used (SPADE, MCAA, the ε/v head). The frozen DSDM runs on q_sample(x0, t_feat) with
the null semantic condition (no mask is known at test time) and the image itself as the
reference; its decoder features `fusion_blocks` enter the same-named segmentation blocks
by cross-attention (`fusion=caa`), a 1x1-conv skip (`skip`) or not at all (`none`: the
plain "denoising U-Net" row of Table 5). The loss is cross-entropy. Augmentation
(Sec. V-A2): horizontal flip (p 0.5) and brightness/contrast (saturation/hue for RGB)
jitter (p 0.8).

The frozen DSDM and reference-encoder weights live in the model-state collection
`frozen`, so a finished run predicts from its own checkpoint (`medrep_jax.load`).
Training data: the real train split plus `synthetic_fraction` of the synthetic pool in
`synthetic_dir` (a `sample` or `filter` stage's images/, Fig. 6).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from medrep_jax import methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.data import transforms as transforms_lib
from medrep_jax.data.augment import ops
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as metrics_lib
from medrep_jax.methods import base
from medrep_jax.methods.dsdm_parts import common, synthetic
from medrep_jax.models import diffusion_unet

FEATURE_SEED = 1234  # the q_sample noise of evaluation and prediction


class SegStage(base.Method):
  """Trains the GroupNorm DSDM U-Net to segment, fed by the frozen DSDM's features."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    if config.fusion not in ("none", "skip", "caa"):
      raise ConfigError(f"fusion={config.fusion!r}; expected 'none', 'skip' or 'caa'")
    if not 0.0 <= float(config.synthetic_fraction) <= 1.0:
      raise ConfigError(f"synthetic_fraction must be in [0, 1], got {config.synthetic_fraction}")

  # ---- the frozen parts
  @functools.cached_property
  def generator(self) -> methods.Trained:
    if not self.config.generator_from:
      raise ConfigError("generator_from is empty: point it at a finished dsdm "
                        "stage=generator run (in the pipeline: 'stage:generator')")
    # First used inside the traced init_state: build the loaded stage's arrays eagerly.
    with jax.ensure_compile_time_eval():
      return methods.load_trained(self.config.generator_from, method="dsdm",
                                  stage="generator")

  @functools.cached_property
  def ref_encoder(self) -> methods.Trained | None:
    gen = self.generator.stage
    if not gen.use_ref:
      return None
    with jax.ensure_compile_time_eval():
      return methods.load_trained(self.generator.config.ref_encoder_from)

  @property
  def num_classes(self) -> int:
    return max(2, int(self.info.num_mask_classes or self.info.num_classes))

  @functools.cached_property
  def model(self) -> diffusion_unet.DiffusionUNet:
    gen_cfg = self.generator.config
    blocks = tuple(self.config.fusion_blocks) if self.config.fusion != "none" else ()
    try:
      return diffusion_unet.get_diffusion_unet(
          str(gen_cfg.model.size), self.num_classes, dtype=jnp.dtype(self.config.dtype),
          fusion=str(self.config.fusion), fusion_blocks=blocks,
          **common.unet_kwargs(gen_cfg.model))
    except ValueError as e:
      raise ConfigError(f"fusion_blocks: {e}") from e

  # ---- data
  def make_source(self, split: str):
    source = super().make_source(split)
    if split == "train":
      source = synthetic.mix(source, self.config, self.num_classes)
    return source

  def planned_train_size(self, planned):
    """Real + `synthetic_fraction` of the pool (counted at its most if not yet written)."""
    real, c = super().planned_train_size(planned), self.config
    if real is None or float(c.synthetic_fraction) <= 0:
      return real
    folder = synthetic.pool_dir(c)
    pool = (planned.get(folder, 0) if base.pending(folder, planned)
            else len(synthetic.read(folder, self.num_classes, self.channels)))
    return real + int(round(float(c.synthetic_fraction) * pool))

  # ---- the DSDM features (Sec. IV-C2)
  def features(self, frozen, x0: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Decoder features of the frozen DSDM on q_sample(x0, t_feat), null mask, the image
    itself as reference; x0 in [-1, 1]."""
    t = jnp.full((x0.shape[0],), int(self.config.t_feat), jnp.int32)
    ref = None
    if self.ref_encoder is not None:
      ref = self.ref_encoder.model.encoder.apply(frozen["ref_encoder"], (x0 + 1.0) / 2.0,
                                                 train=False)["pooled"]
    feats = common.diffusion_features(self.generator.stage, frozen["dsdm"], x0, t,
                                      jax.random.normal(key, x0.shape), ref=ref)
    return {k: jax.lax.stop_gradient(feats[k]) for k in self.config.fusion_blocks}

  def logits(self, params, frozen, images: jax.Array, key: jax.Array) -> jax.Array:
    x0 = images * 2.0 - 1.0
    fused = self.features(frozen, x0, key) if self.config.fusion != "none" else None
    t = jnp.full((x0.shape[0],), int(self.config.t_feat), jnp.int32)
    return self.model.apply({"params": params}, x0, t, fused=fused)

  # ---- state
  def init_variables(self, rng, batch):
    """Fresh seg params with every matching DSDM array copied in, plus the frozen DSDM
    (EMA weights) and reference encoder in the `frozen` collection."""
    x = batch["image"] * 2.0 - 1.0
    t = jnp.zeros((x.shape[0],), jnp.int32)
    frozen = {"dsdm": self.generator.run.extras["ema"]}
    if self.ref_encoder is not None:
      frozen["ref_encoder"] = self.ref_encoder.run.variables("encoder")
    fused = None
    if self.config.fusion != "none":
      fused = self.features(frozen, x, rng)
    params = self.model.init(rng, x, t, fused=fused)["params"]
    if self.config.init_from_generator:
      params = self._transfer(params, frozen["dsdm"])
    return {"params": params, "frozen": frozen}

  def _transfer(self, params, dsdm_params):
    # The ε/v head (out_conv) predicts other channels than the K class logits: left new.
    head_free = {k: v for k, v in jax.device_get(dsdm_params).items() if k != "out_conv"}
    merged, loaded, fresh = ckpt_lib.merge_by_path(params, head_free)
    src = traverse_util.flatten_dict(dsdm_params, sep="/")
    unused = sorted(set(src) - set(loaded))
    if self.workdir is not None and jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      lines = ([f"init_from: {self.config.generator_from} (EMA weights)",
                f"loaded {len(loaded)} arrays, left {len(fresh)} new, "
                f"{len(unused)} DSDM arrays not used", "", "# loaded"] + loaded
               + ["", "# new"] + fresh + ["", "# not used (SPADE, MCAA, output head)"]
               + unused)
      (self.workdir / "init_from.txt").write_text("\n".join(lines) + "\n")
    return merged

  # ---- loss
  def augment(self, rng, batch):
    """hflip (p 0.5) of image and mask; colour jitter (p 0.8) of the image (Sec. V-A2)."""
    k_flip, k_jit, k_on = jax.random.split(rng, 3)
    b = batch["image"].shape[0]
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    image = jnp.where(flip[:, None, None, None], batch["image"][:, :, ::-1], batch["image"])
    mask = jnp.where(flip[:, None, None], batch["mask"][:, :, ::-1], batch["mask"])
    jittered = jax.vmap(ops.color_jitter)(image, jax.random.split(k_jit, b))
    on = jax.random.bernoulli(k_on, float(self.config.augment.jitter_p), (b,))
    image = jnp.where(on[:, None, None, None], jittered, image)
    return {**batch, "image": image, "mask": mask}

  def loss_fn(self, params, state, batch, rng):
    """Pixel-wise cross-entropy (Sec. V-A2)."""
    k_aug, k_feat = jax.random.split(rng)
    if self.config.augment.enabled:
      batch = self.augment(k_aug, batch)
    logits = self.logits(params, state.model_state["frozen"], batch["image"], k_feat)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["mask"].astype(jnp.int32))
    return jnp.mean(ce), {}

  # ---- inference and eval
  def predict(self, variables, images: jax.Array) -> dict[str, jax.Array]:
    """{"mask": (B, H, W) uint8, "probs": (B, H, W, K)} for images in [0, 1]."""
    logits = self.logits(variables["params"], variables["frozen"], images,
                         jax.random.key(FEATURE_SEED))
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    return {"mask": jnp.argmax(probs, -1).astype(jnp.uint8), "probs": probs}

  @property
  def predict_classes(self) -> tuple[str, ...]:
    names = tuple(self.info.class_names)
    return names if len(names) == self.num_classes else tuple(
        f"class_{k}" for k in range(self.num_classes))

  def eval_step(self, state, batch):
    pred = self.predict(state.variables(), batch["image"])
    return {"index": batch["index"], "pred": pred["mask"],
            "mask": batch["mask"].astype(jnp.uint8)}

  def evaluate(self, outputs, state, ctx):
    k = self.num_classes
    cm = metrics_lib.confusion_matrix(outputs["mask"], outputs["pred"], k)
    scores = metrics_lib.confusion_scores(cm, include_background=True)
    metrics = {key: scores[key] for key in ("mean_dice", "mean_iou", "mean_precision",
                                            "mean_recall", "accuracy")}
    fg = metrics_lib.segmentation_metrics(outputs["pred"], outputs["mask"], k)
    metrics.update(fg_dice=fg["dice"], fg_iou=fg["iou"])
    if not ctx.final:
      return base.Result(metrics)
    return base.Result(metrics, {"segmentation overlays": self._overlay(outputs, ctx)}, [
        "## Segmentation", "",
        f"`mean_dice`, `mean_iou`, `mean_precision`, `mean_recall`: over the {k} classes "
        f"including background, from one confusion matrix of every {ctx.split} pixel "
        f"(the paper's mDice / mIoU); `accuracy`: pixel accuracy; `fg_dice`/`fg_iou`: per "
        f"image, foreground classes. Fusion: {self.config.fusion} of DSDM blocks "
        f"{tuple(self.config.fusion_blocks)} at t = {self.config.t_feat}."])

  def _overlay(self, outputs, ctx) -> str:
    n = min(8, len(outputs["index"]))
    source, tfs = self.make_source(ctx.split), self.transforms(ctx.split)
    images = [transforms_lib.apply_transforms(source[int(i)], tfs)["image"]
              for i in outputs["index"][:n]]
    path = fig_lib.segmentation_overlay_grid(
        np.stack(images), outputs["mask"][:n], outputs["pred"][:n],
        ctx.figures_dir / "segmentation_overlays.png",
        title=f"step {ctx.step}: ground truth vs prediction")
    return os.path.relpath(path, ctx.workdir)
