"""LDM: latent diffusion for synthetic medical images (dual-stream paper, Stage 1, eq. 1-2).

Four stages, chosen by `config.stage` (the default config runs all four as a pipeline):
  - `vae`: KL-regularized autoencoder, f = 4 (256² → 64²×c), L1 + KL (+ PatchGAN);
  - `unet`: ε-prediction latent UNet on cached frozen-VAE latents, with EMA, evaluated by
    Frechet distance / KID of decoded DDIM samples;
  - `sample`: N synthetic images (DDPM with all T steps, or DDIM) written as an
    `image_folder` dataset;
  - `filter`: automatic curation (realism + memorization scores), replacing the paper's
    manual selection.
"""
from __future__ import annotations

STAGES = ("vae", "unet", "sample", "filter")


def build(config):
  stage = config.get("stage", "")
  if stage == "vae":
    from medrep_jax.methods.ldm_parts.vae_stage import VAEStage
    return VAEStage(config)
  if stage == "unet":
    from medrep_jax.methods.ldm_parts.unet_stage import UNetStage
    return UNetStage(config)
  if stage == "sample":
    from medrep_jax.methods.ldm_parts.sample_stage import SampleStage
    return SampleStage(config)
  if stage == "filter":
    from medrep_jax.methods.ldm_parts.filter_stage import FilterStage
    return FilterStage(config)
  raise ValueError(f"ldm: config.stage={stage!r}; expected one of {STAGES}")
