"""DSDM stage `generator`: the dual semantic diffusion model (paper 004, Sec. IV-B).

ε_θ(x_t, t, mask, ref) is a `DiffusionUNet` with SPADE on the one-hot mask in the decoder
(and the middle block with `model.spade_mid`, as SDM) and MCAA (eq. 10-11) on the 512-d
embedding of a reference image by the frozen reference encoder (a SimCLR ResNet-18 run,
`ref_encoder_from`). In training the reference is the image itself; both conditions are
dropped together with probability `p_uncond` (eq. 17's null condition). The loss is the
hybrid L_simple + λ L_vlb with the learned-range variance (eq. 14-16, improved DDPM), on a
cosine schedule; the EMA of the weights (`extras["ema"]`) is what sampling uses.

Evaluation samples, with guidance s = `sample.guidance_scale` (eq. 17), one image for each
eval mask with the reference taken from ANOTHER eval image (a fixed derangement; the
image's own reference would leak its content), and reports FD/KID to the eval images in
the reference encoder's feature space, plus the diversity of `eval.diversity_samples`
samples of `eval.diversity_masks` masks (mean pairwise feature distance; LPIPS's weights
cannot be downloaded here, so the paper's LPIPS diversity is reported as
`lpips_diversity` only when `eval.lpips_weights` names a user-supplied .npz, see
`eval.lpips`).
"""
from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax import diffusion
from medrep_jax.config_lib import ConfigError
from medrep_jax.data import loader
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import generative, lpips
from medrep_jax.methods import base
from medrep_jax.methods.dsdm_parts import common


class WithRef:
  """A source whose records gain "ref": the reference embedding of their own image."""

  def __init__(self, source, refs: np.ndarray):
    if len(refs) != len(source):
      raise ValueError(f"{len(refs)} reference embeddings for {len(source)} records")
    self.source, self.refs, self.info = source, refs, source.info

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    return {**self.source[int(i)], "ref": self.refs[int(i)]}


def derangement(n: int, seed: int) -> np.ndarray:
  """A permutation with no fixed point (n >= 2): the reference of eval image i."""
  if n < 2:
    return np.zeros(n, np.int64)
  perm = np.random.default_rng(seed).permutation(n)
  return np.roll(perm, 1)[np.argsort(perm)]


def diversity(features: np.ndarray) -> float:
  """Mean pairwise Euclidean distance between the K samples of each mask, averaged over
  masks: features (M, K, D). Higher is more diverse (the paper's LPIPS role, Sec. V-A3)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 3 or f.shape[1] < 2:
    raise ValueError(f"diversity needs (masks, K >= 2, D) features, got {f.shape}")
  d = np.sqrt(np.maximum(((f[:, :, None] - f[:, None]) ** 2).sum(-1), 0.0))
  k = f.shape[1]
  return float((d.sum((1, 2)) / (k * (k - 1))).mean())


class GeneratorStage(base.EMAParams, base.Method):
  """Trains ε_θ(x_t, t, mask, ref) with the hybrid loss and condition dropout."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    self.use_mask, self.use_ref = common.conditions_of(config.variant)
    d = config.diffusion
    try:
      self.sched = diffusion.make_schedule(str(d.schedule), int(d.num_timesteps))
    except ValueError as e:
      raise ConfigError(f"diffusion: {e}") from e
    if not 0.0 <= float(config.p_uncond) < 1.0:
      raise ConfigError(f"p_uncond must be in [0, 1), got {config.p_uncond}")
    self._eval = None

  @property
  def num_mask_classes(self) -> int:
    return int(self.config.data.get("num_mask_classes", 0) or 0) or int(
        self.info.num_mask_classes or self.info.num_classes)

  @functools.cached_property
  def model(self):
    return common.build_generator(self.config, self.channels, self.num_mask_classes)

  @functools.cached_property
  def embedder(self) -> common.ReferenceEmbedder:
    return common.load_embedder(str(self.config.ref_encoder_from))

  def embed(self, images: np.ndarray) -> np.ndarray:
    refs = self.embedder(images)
    common.check_embed_dim(refs, int(self.config.model.ref_embed_dim),
                           self.config.ref_encoder_from)
    return refs

  # ---- data: train records carry their own reference embedding
  def make_source(self, split: str):
    source = super().make_source(split)
    if split == "train":  # eval's feature space: a missing run fails now, not after training
      _ = self.embedder
    if split != "train" or not self.use_ref:
      return source
    cache = pathlib.Path(self.workdir) / "ref_train.npy" if self.workdir else None
    if cache is not None and cache.exists():
      refs = np.load(cache)
    else:
      got = loader.collect(source, self.transforms(split))
      refs = np.zeros((len(source), int(self.config.model.ref_embed_dim)), np.float32)
      refs[got["index"]] = self.embed(got["image"])
      if cache is not None and jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, refs)
    return WithRef(source, refs)

  # ---- state and loss
  def _cond(self, batch):
    return common.make_cond(self.use_mask, self.use_ref, batch.get("mask"),
                            self.num_mask_classes, batch.get("ref"))

  def init_variables(self, rng, batch):
    x, cond = batch["image"], self._cond(batch) or {}
    return self.model.init(rng, x, jnp.zeros((x.shape[0],), jnp.int32),
                           spatial_cond=cond.get("mask"), ref_embed=cond.get("ref"))

  def init_extras(self, rng, batch, params, model_state):
    return {"ema": params}

  def loss_fn(self, params, state, batch, rng):
    """Hybrid loss (eq. 14-16) on x0 in [-1, 1], conditions dropped together (p_uncond)."""
    k_flip, k_drop, k_diff, k_dropout = jax.random.split(rng, 4)
    if self.config.augment.hflip:
      flip = jax.random.bernoulli(k_flip, 0.5, (batch["image"].shape[0],))
      batch = {**batch, "image": jnp.where(flip[:, None, None, None],
                                           batch["image"][:, :, ::-1], batch["image"])}
      if "mask" in batch:
        batch["mask"] = jnp.where(flip[:, None, None], batch["mask"][:, :, ::-1],
                                  batch["mask"])
    cond = self._cond(batch)
    if cond is not None and float(self.config.p_uncond) > 0:
      cond, _ = diffusion.drop_condition(k_drop, cond, float(self.config.p_uncond), 0.0)
    apply = common.apply_fn(self.model)
    model_fn = lambda x, t, c: apply(params, x, t, c, train=True,
                                     rngs={"dropout": k_dropout})
    out = diffusion.training_losses(self.sched, model_fn, batch["image"] * 2.0 - 1.0, k_diff,
                                    learned_variance=True, loss_type="hybrid", cond=cond,
                                    lambda_vlb=float(self.config.loss.lambda_vlb))
    return jnp.mean(out["loss"]), {"metrics": {"mse": jnp.mean(out["mse"]),
                                               "vlb": jnp.mean(out["vlb"])}}

  # ---- sampling (the eval below and the `sample` stage)
  def sample(self, params, *, masks=None, refs=None, num: int, seed: int,
             guidance_scale: float | None = None, progress: bool = False) -> np.ndarray:
    """`num` images in [0, 1]; row i conditioned on masks[i] (int (H, W)) and refs[i]."""
    s, size = self.config.sample, int(self.config.data.image_size)
    scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
    if not (self.use_mask or self.use_ref):
      scale = 0.0
    return common.sample_conditioned(
        self.model, self.sched, params, masks=masks, refs=refs,
        num_classes=self.num_mask_classes, use_mask=self.use_mask, use_ref=self.use_ref,
        image_shape=(size, size, self.channels), num=num, seed=seed, sampler=str(s.sampler),
        num_steps=int(s.steps), guidance_scale=scale, eta=float(s.eta),
        batch_size=int(s.batch_size), progress=progress)

  # ---- eval: FD/KID and diversity in the reference encoder's feature space
  def _eval_data(self):
    if self._eval is None:
      e, split = self.config.eval, self.config.train.eval_split
      real = loader.collect(super().make_source(split), self.transforms(split),
                            limit=int(e.num_samples))
      real["ref"] = self.embed(real["image"])
      real["feat"] = self.embedder(real["image"])
      real["ref_of"] = derangement(len(real["image"]), int(self.config.seed))
      self._eval = real
    return self._eval

  def _score(self, params, real, guidance_scale: float) -> tuple[dict, np.ndarray]:
    """FD/KID (bootstrap bounds) and diversity of samples at one guidance scale."""
    e, n, other = self.config.eval, len(real["image"]), real["ref_of"]
    masks = real.get("mask")
    fake = self.sample(params, masks=masks, refs=real["ref"][other], num=n,
                       seed=int(self.config.seed) + 1, guidance_scale=guidance_scale)
    metrics = generative.generative_metrics(real["feat"], self.embedder(fake),
                                            label=self.embedder.label,
                                            num_boot=int(e.num_boot))
    m, k = min(int(e.diversity_masks), n), int(e.diversity_samples)
    if m > 0 and k >= 2:
      pick = np.repeat(np.arange(m), k)
      many = self.sample(params, masks=None if masks is None else masks[pick],
                         refs=real["ref"][other][pick], num=m * k,
                         seed=int(self.config.seed) + 2, guidance_scale=guidance_scale)
      metrics["diversity"] = diversity(self.embedder(many).reshape(m, k, -1))
      if self.lpips is not None:  # the paper's LPIPS, with the user's weights
        metrics["lpips_diversity"] = lpips.diversity_lpips(
            self.lpips, many.reshape((m, k) + many.shape[1:]))
    return metrics, fake

  @functools.cached_property
  def lpips(self) -> lpips.LPIPSNet | None:
    """LPIPS-VGG from `eval.lpips_weights` (an .npz; `eval.lpips`), or None."""
    path = str(self.config.eval.get("lpips_weights", "") or "")
    return lpips.load_lpips(path) if path else None

  def evaluate_state(self, state, ctx):
    e, real = self.config.eval, self._eval_data()
    params, s = state.extras["ema"], float(self.config.sample.guidance_scale)
    if not (self.use_mask or self.use_ref):
      s = 0.0  # nothing to guide: `sample` draws the unconditional model
    metrics, fake = self._score(params, real, s)
    label = metrics.pop("feature_net")
    if ctx.final and (self.use_mask or self.use_ref):  # more scales (Table 2's s = 0 row)
      for extra in (float(v) for v in e.get("extra_guidance_scales", ())):
        more, _ = self._score(params, real, extra)
        more.pop("feature_net")
        metrics.update({f"{k}@s{extra:g}": v for k, v in more.items()})
    if not ctx.final:
      return base.Result(metrics)
    n, k = len(fake), int(e.diversity_samples)
    return base.Result(metrics, {"mask | reference | sample": self._figure(ctx, real, fake)}, [
        "## Generation", "",
        f"Feature network: {label}. FD and KID: {n} samples (EMA weights, "
        f"{self.config.sample.sampler}-{self.config.sample.steps}, guidance s = {s:g}) for "
        f"the {ctx.split} masks, each with the reference of another {ctx.split} image, "
        f"against those {n} real images; `fd_lo`/`fd_hi`: 95% bootstrap bounds. "
        f"`diversity`: mean pairwise feature distance of {k} samples per mask over "
        f"{min(int(e.diversity_masks), n)} masks (in place of LPIPS). Metrics `...@sX`: "
        f"the same at guidance scale X."])

  def _figure(self, ctx, real, fake) -> str:
    rows = min(6, len(fake))
    tiles, titles = [], []
    for i in range(rows):
      mask = real["mask"][i] if "mask" in real else np.zeros(fake.shape[1:3], np.int32)
      tiles += [fig_lib.overlay_mask(real["image"][i], mask),
                real["image"][real["ref_of"][i]], fake[i]]
      titles += [f"mask {i}", "reference", "sample"]
    tiles = [t if t.ndim == 3 and t.shape[-1] == 3 else
             np.repeat(t.reshape(t.shape[:2] + (1,)), 3, -1) for t in tiles]
    path = fig_lib.image_grid(np.stack(tiles), ctx.figures_dir / "samples.png", nrow=3,
                              titles=titles, value_ranges=[(0.0, 1.0)] * len(tiles))
    return os.path.relpath(path, ctx.workdir)
