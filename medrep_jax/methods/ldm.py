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

STAGES = {"vae": "ldm_parts.vae_stage:VAEStage",
          "unet": "ldm_parts.unet_stage:UNetStage",
          "sample": "ldm_parts.sample_stage:SampleStage",
          "filter": "ldm_parts.filter_stage:FilterStage"}
