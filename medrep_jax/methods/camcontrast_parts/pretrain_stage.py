"""CAMContrast stage 2: image-heatmap contrastive learning, and the baselines of Sec. 4.4.

Sec. 3.2, eq. 5, Algorithm 1 (lines 9-31): for a batch of B image crops x_i and their
heatmap crops h(x_i), z¹_i = g_I(f_I(t(x_i))) with a standard augmentation t, and
z²_i = g_h(f_h(h(x_i))) with no augmentation; the loss is NT-Xent over the 2B normalized
projections with τ = 0.05 (`losses.contrastive.nt_xent`, the mean of
L_con(z¹_i, z²_i) + L_con(z²_i, z¹_i) over 2B).

`loss.objective` and `data_source` give the baselines as configs of this code:
  image_heatmap  CAMContrast (crops + heatmaps)
  nt_xent        SimCLR: two augmented views of the same image (or crop)
  supcon         SupCon (Khosla et al.) on two views with the coarse labels
  ce             SupCE: a linear head on f_I, cross-entropy on the coarse labels
with `data_source="crops"` (the "-crop" variants: fixed crops as independent instances)
or `"images"` (a random half-size crop of the whole image, the conventional strategy).
Only the encoder f_I (`params["encoder"]`) is kept for downstream tasks.

Random crops and two views (SimCLR, SupCon on whole images, or on stored whole images with
crop=random): `crops.views="independent"` (the configs' default) gives each view its own
random crop box, the conventional "two random crops within each image as positive pairs"
of Sec. 3.2 (`crops.independent_crops`); `"shared"` (what a config without the field gets,
as runs made before it) cuts one crop per image and augments it twice. CAMContrast's image
and heatmap crops always share one box (`crops.random_aligned_crops`).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medrep_jax.config_lib import ConfigError
from medrep_jax.data import augment, transforms
from medrep_jax.losses import contrastive as cl
from medrep_jax.losses import segmentation as seg_losses
from medrep_jax.methods import base, ssl_base
from medrep_jax.methods.camcontrast_parts import common, crops, heatmap_stage
from medrep_jax.models import cam, heads

OBJECTIVES = ("image_heatmap", "nt_xent", "supcon", "ce")
DATA_SOURCES = ("crops", "images")
CROP_VIEWS = ("independent", "shared")
TWO_VIEW_OBJECTIVES = ("nt_xent", "supcon")


class PretrainNet(nn.Module):
  """f_I (named `encoder`) + g_I, and f_h + g_h or a linear head where the objective needs."""
  encoder: nn.Module
  projector: nn.Module | None = None
  heatmap_encoder: nn.Module | None = None
  heatmap_projector: nn.Module | None = None
  head: nn.Module | None = None

  def embed(self, x: jax.Array, train: bool) -> jax.Array:
    """z = g_I(f_I(x)), or the linear head's logits for SupCE."""
    feats = self.encoder(x, train)
    if self.head is not None:
      return self.head(feats["pooled"].astype(jnp.float32))
    return self.projector(feats, train)

  def embed_heatmap(self, h: jax.Array, train: bool) -> jax.Array:
    """z = g_h(f_h(h))."""
    return self.heatmap_projector(self.heatmap_encoder(h, train), train)

  def pair(self, x: jax.Array, h: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    return self.embed(x, train), self.embed_heatmap(h, train)

  def features(self, x: jax.Array) -> jax.Array:
    return self.encoder(x, False)["pooled"].astype(jnp.float32)

  def __call__(self, x: jax.Array, h: jax.Array | None = None, train: bool = False):
    if self.heatmap_encoder is not None and h is not None:
      return self.pair(x, h, train)
    return self.embed(x, train)


class PretrainStage(ssl_base.PretrainMethod):
  """One step for CAMContrast and every baseline; see the module docstring."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    l = config.loss
    if l.objective not in OBJECTIVES:
      raise ValueError(f"loss.objective={l.objective!r}; expected one of {OBJECTIVES}")
    if config.data_source not in DATA_SOURCES:
      raise ValueError(f"data_source={config.data_source!r}; expected one of {DATA_SOURCES}")
    if l.objective == "image_heatmap" and config.data_source != "crops":
      raise ValueError("loss.objective='image_heatmap' needs heatmaps: set "
                       "data_source='crops' and crops_from=<a heatmaps run>")
    crops_config = config.get("crops")
    self.crop_views = str(crops_config.get("views", "shared")) if crops_config else "shared"
    if self.crop_views not in CROP_VIEWS:
      raise ConfigError(f"crops.views={self.crop_views!r}; expected one of {CROP_VIEWS} "
                        f"(independent: one random crop per view, Sec. 3.2)")
    self.manifest: dict = {}

  # ---- data
  @property
  def uses_crops(self) -> bool:
    return self.config.data_source == "crops"

  def make_source(self, split: str):
    if split != "train" or not self.uses_crops:
      return super().make_source(split)
    source, self.manifest = heatmap_stage.load_crops(self.config.crops_from, "train")
    if self.manifest["channels"] != self.channels:
      raise ValueError(f"crops in {self.config.crops_from} have {self.manifest['channels']} "
                       f"channels but the data gives {self.channels} (data.channels="
                       f"{self.config.data.channels})")
    self.check_data(len(source))
    return source

  def transforms(self, split: str) -> list:
    if split == "train" and self.uses_crops:  # crops are stored at their final size
      return [transforms.Normalize(mode="unit")]
    return super().transforms(split)

  @property
  def random_crop(self) -> bool:
    """Whole images in the batch: take a random half-size crop on device (Table 3)."""
    return not self.uses_crops or self.manifest.get("strategy") == "random"

  # ---- model
  @functools.cached_property
  def model(self) -> PretrainNet:
    c, m = self.config, self.config.model
    dtype = jnp.dtype(c.dtype)

    def projector():
      return heads.make_projector("mlp", hidden_dim=int(m.mlp_hidden),
                                  out_dim=int(m.embed_dim), dtype=dtype)

    kw = {}
    if c.loss.objective == "ce":
      kw["head"] = nn.Dense(2, dtype=jnp.float32, name="head")
    else:
      kw["projector"] = projector()
    if c.loss.objective == "image_heatmap":
      kw["heatmap_encoder"] = cam.HeatmapEncoder(tuple(m.heatmap_widths), dtype=dtype)
      kw["heatmap_projector"] = projector()
    return PretrainNet(encoder=common.encoder_of(c), **kw)

  @property
  def independent_crops(self) -> bool:
    """Each of the two views gets its own random crop (`crops.views="independent"`)."""
    return (self.random_crop and self.config.loss.objective in TWO_VIEW_OBJECTIVES
            and self.crop_views == "independent")

  def _inputs(self, batch, rng):
    """(image crops, heatmap crops or None) of the batch; the image crops are (2, B, ...),
    one per view, with `independent_crops`."""
    x, h = batch["image"], batch.get("heatmap")
    stride = int(self.manifest.get("stride", 1))
    if self.independent_crops:
      return crops.independent_crops(rng, x, 2, stride), None
    if self.random_crop:
      x, h = crops.random_aligned_crops(rng, x, h, stride)
    return x, h

  def init_variables(self, rng, batch):
    x, h = self._inputs(batch, jax.random.key(0))
    return self.model.init(rng, x[0] if self.independent_crops else x, h, train=False)

  def _views(self, rng, x, idx):
    """(2, B, ...) augmented views: two of each crop x (B, ...), or with
    `independent_crops` one of each view's own crop x[v] (x is (2, B, ...)), with the view
    keys of `augment.make_views`."""
    policy = self.config.augment.policy
    if not self.independent_crops:
      return augment.make_views(rng, x, policy, 2, indices=idx)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(2, dtype=jnp.uint32))
    return jax.vmap(lambda k, v: augment.augment_batch(policy, k, v, indices=idx))(keys, x)

  # ---- step
  def _labels(self, batch):
    """Coarse labels: stored with the crops, or made from the dataset's labels."""
    if self.uses_crops:
      return batch["label"]
    labels = common.coarse_labels(batch["label"], int(self.config.coarse.normal_class))
    return jnp.any(labels > 0, -1).astype(jnp.int32) if labels.ndim == 2 else labels

  def loss(self, params, model_state, batch, x, h, rng):
    """(loss, {"updates": batch stats}) of the configured objective on crops x (and
    heatmaps h)."""
    c, l = self.config, self.config.loss
    variables = {"params": params, **model_state}
    policy, idx, tau = c.augment.policy, batch["index"], float(l.temperature)
    apply = functools.partial(self.model.apply, variables, mutable=["batch_stats"])
    if l.objective == "image_heatmap":  # eq. 5, Algorithm 1
      v = augment.augment_batch(policy, rng, x, indices=idx)
      (z1, z2), updates = apply(v, h, True, method=PretrainNet.pair)
      return jnp.mean(cl.nt_xent(z1, z2, tau)), {"updates": updates}
    if l.objective == "ce":
      v = augment.augment_batch(policy, rng, x, indices=idx)
      logits, updates = apply(v, True, method=PretrainNet.embed)
      labels = self._labels(batch)
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
      return loss, {"updates": updates}
    views = self._views(rng, x, idx)
    b = views.shape[1]
    z, updates = apply(views.reshape((2 * b,) + views.shape[2:]), True,
                       method=PretrainNet.embed)
    if l.objective == "nt_xent":
      return jnp.mean(cl.nt_xent(z[:b], z[b:], tau)), {"updates": updates}
    both = jnp.tile(self._labels(batch), 2)
    per = cl.supcon(z, both, tau)
    loss = seg_losses.reduce_batch(per, cl.has_positive(both).astype(jnp.float32))
    return loss, {"updates": updates}

  def train_step(self, state, batch, rng):
    k_crop, k_aug = jax.random.split(rng)
    x, h = self._inputs(batch, k_crop)

    state, metrics, _ = base.gradient_step(
        state, lambda params: self.loss(params, state.model_state, batch, x, h, k_aug))
    return state, metrics
