"""Pieces the DSDM stages share: the variants' conditions, the generator UNet, the
reference embedder and guided, batched sampling (paper 004, Sec. IV-B, eq. 10-17).

A DSDM condition is a dict with "mask" (the one-hot semantic map, SPADE) and/or "ref" (the
512-d reference embedding, MCAA). Its null value is zeros for both (the SDM convention for
the mask; the reference's null is unstated in the paper); they are dropped together
(`gaussian.drop_condition`) in training and replaced together for guidance (eq. 17).
"""
from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medrep_jax import diffusion, methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.models import diffusion_unet

# variant -> (semantic mask, reference image) (Table 1's rows).
VARIANTS = {"uncond": (False, False), "mask": (True, False), "reference": (False, True),
            "mask_reference": (True, True)}


def conditions_of(variant: str) -> tuple[bool, bool]:
  """(uses the mask, uses the reference) of a Table 1 variant."""
  if variant not in VARIANTS:
    raise ConfigError(f"variant={variant!r}; expected one of {list(VARIANTS)}")
  return VARIANTS[variant]


def unet_kwargs(model_cfg) -> dict:
  """The DiffusionUNet attributes of `config.model` (a preset plus its overrides)."""
  m = model_cfg
  kw = {}
  for key in ("base_width", "num_res_blocks", "spade_hidden", "ref_token_dim", "head_dim",
              "num_heads"):
    if int(m.get(key, 0) or 0) > 0:
      kw[key] = int(m[key])
  for key in ("channel_mult", "attention_resolutions"):
    if tuple(m.get(key, ()) or ()):
      kw[key] = tuple(int(x) for x in m[key])
  if tuple(m.get("ref_attention_resolutions", ()) or ()):
    kw["ref_attention_resolutions"] = tuple(int(x) for x in m.ref_attention_resolutions)
  if "spade_mid" in m:
    kw["spade_mid"] = bool(m.spade_mid)
  kw["dropout"] = float(m.get("dropout", 0.0))
  return kw


def build_generator(config, channels: int, num_mask_classes: int) -> diffusion_unet.DiffusionUNet:
  """ε_θ(x_t, t, mask, ref) with the learned-range variance output (2C channels)."""
  use_mask, use_ref = conditions_of(config.variant)
  try:
    return diffusion_unet.get_diffusion_unet(
        str(config.model.size), int(channels), learned_variance=True,
        spade_channels=num_mask_classes if use_mask else 0,
        ref_embed_dim=int(config.model.ref_embed_dim) if use_ref else 0,
        dtype=jnp.dtype(config.dtype), remat=bool(config.get("remat", False)),
        **unet_kwargs(config.model))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"model: {e}") from e


def make_cond(use_mask: bool, use_ref: bool, masks=None, num_classes: int = 0, refs=None):
  """The condition dict of a batch: {"mask": one-hot (B, H, W, K), "ref": (B, n)}; None
  when the variant is unconditional."""
  cond = {}
  if use_mask:
    cond["mask"] = jax.nn.one_hot(masks, num_classes, dtype=jnp.float32)
  if use_ref:
    cond["ref"] = jnp.asarray(refs, jnp.float32)
  return cond or None


def apply_fn(model: diffusion_unet.DiffusionUNet):
  """`(params, x, t, cond) -> output` of the diffusion core for a DSDM generator."""
  def fn(params, x, t, cond, train: bool = False, rngs=None):
    cond = cond or {}
    return model.apply({"params": params}, x, t, spatial_cond=cond.get("mask"),
                       ref_embed=cond.get("ref"), train=train, rngs=rngs)
  return fn


class ReferenceEmbedder:
  """The frozen reference encoder (a camcontrast/SimCLR pretrain run): images -> (N, n).

  Wraps `eval.feature_nets` "encoder" (the pooled output of the run's encoder: 512-d for
  ResNet-18, the paper's reference embedding)."""

  def __init__(self, run_dir: str | pathlib.Path, batch_size: int = 64):
    if not run_dir:
      raise ConfigError("ref_encoder_from is empty: point it at a finished reference-encoder "
                        "run (configs/dsdm.py:stage=ref_encoder; in the pipeline "
                        "'stage:ref_encoder')")
    self.net = methods.feature_net("encoder", run_dir, batch_size=batch_size)
    self.run_dir = str(run_dir)
    self.label = self.net.label

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self.net(images), np.float32)


@functools.lru_cache(maxsize=4)
def load_embedder(run_dir: str) -> ReferenceEmbedder:
  return ReferenceEmbedder(run_dir)


def check_embed_dim(embeds: np.ndarray, expected: int, run_dir: str) -> None:
  if embeds.ndim != 2 or embeds.shape[1] != expected:
    raise ConfigError(f"the reference encoder {run_dir} gives embeddings of shape "
                      f"{embeds.shape[1:]}, but model.ref_embed_dim={expected}; set "
                      f"--config.model.ref_embed_dim={embeds.shape[-1]}")


def sample_conditioned(model, sched, params, *, masks: np.ndarray | None,
                       refs: np.ndarray | None, num_classes: int, use_mask: bool,
                       use_ref: bool, image_shape: tuple[int, int, int], num: int, seed: int,
                       sampler: str, num_steps: int, guidance_scale: float, eta: float,
                       batch_size: int, progress: bool = False) -> np.ndarray:
  """`num` images in [0, 1] for the conditions (row i uses masks[i], refs[i]).

  One compilation serves every batch and every call with the same `batch_size`: batches
  always have that size (the last, or a short request, is padded). Guidance (eq. 17) runs the conditional and the null condition in one call.
  """
  h, w, c = image_shape
  batch = max(1, int(batch_size))
  shape = (batch, h, w, c)
  kwargs = dict(learned_variance=True, clip_x0=1.0, guidance_scale=float(guidance_scale))
  if sampler == "ddim":
    kwargs.update(num_steps=int(num_steps), eta=float(eta))
  elif sampler == "ddpm" and 0 < int(num_steps) < sched.num_timesteps:
    sched, _ = diffusion.respace(sched, diffusion.space_timesteps(sched.num_timesteps,
                                                                  int(num_steps)))
  conditional = use_mask or use_ref
  if float(guidance_scale) != 0.0:
    if not conditional:
      raise ConfigError("guidance_scale != 0 needs a conditional variant (mask, reference "
                        "or mask_reference); set guidance_scale=0 for uncond")
    kwargs["null_cond"] = 0.0
  sample = diffusion.make_sampler(apply_fn(model), sched, shape, sampler=sampler, **kwargs)
  out = []
  rng = jax.random.key(seed)

  def take(a, i):
    part = np.asarray(a[i * batch:(i + 1) * batch])
    if len(part) < batch:
      part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), 0)])
    return part

  for i in tqdm(range(math.ceil(num / batch)), desc=f"sampling ({sampler})",
                disable=not progress or jax.process_index() != 0):
    cond = make_cond(use_mask, use_ref, take(masks, i) if use_mask else None, num_classes,
                     take(refs, i) if use_ref else None)
    x = sample(params, jax.random.fold_in(rng, i), cond)
    out.append(np.asarray(jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)))
  return np.concatenate(out)[:num]


def diffusion_features(gen, params, x0: jax.Array, t: jax.Array, noise: jax.Array, *,
                       ref: jax.Array | None = None, masks: jax.Array | None = None
                       ) -> dict[str, jax.Array]:
  """Decoder features {"dec_i": ...} of the generator stage `gen` (weights `params`) on
  q_sample(x0, t, noise) (x0 in [-1, 1], t schedule indices (B,)).

  The semantic condition is `masks` (int (B, H, W): the "dual semantic condition" of
  Fig. 3) or, when None, the null (zero) map: at segmentation time no mask is known
  (Sec. IV-C2). `ref` is the reference embedding (the image's own, for segmentation).
  """
  xt = diffusion.q_sample(gen.sched, x0, t, noise)
  cond = {}
  if gen.use_mask:
    cond["mask"] = (jax.nn.one_hot(masks, gen.num_mask_classes, dtype=jnp.float32)
                    if masks is not None else
                    jnp.zeros(x0.shape[:3] + (gen.num_mask_classes,), jnp.float32))
  if gen.use_ref:
    if ref is None:
      raise ValueError("the generator takes a reference embedding: pass ref")
    cond["ref"] = ref
  _, feats = gen.model.apply({"params": params}, xt, gen.sched.timestep_map[t],
                             spatial_cond=cond.get("mask"), ref_embed=cond.get("ref"),
                             return_features=True)
  return feats
