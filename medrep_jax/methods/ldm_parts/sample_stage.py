"""LDM stage `sample`: N synthetic images written as a dataset the data layer reads.

Images go to WORKDIR/images/synthetic/*.png, an `image_folder` dataset
(`data.name=image_folder, data.root=WORKDIR/images`), and a grid to WORKDIR/samples/.
The sampler is DDPM with all T steps (as in the paper) or DDIM with a few dozen steps.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from medrep_jax import diffusion
from medrep_jax.data import arrays
from medrep_jax.eval import figures as fig_lib
from medrep_jax.methods import base
from medrep_jax.methods.ldm_parts import common
from medrep_jax.train import report as report_lib
from medrep_jax.train import runs


def load_latent_model(unet_from: str, vae_from: str):
  """(unet, schedule, loaded VAE, EMA params, scale factor, latent shift, unet config)."""
  loaded_vae = common.load_vae(vae_from)
  ucfg, tree = runs.load_run(unet_from)
  unet = common.latent_unet(ucfg, loaded_vae.latent_channels)
  sched = diffusion.make_schedule(ucfg.diffusion.schedule, int(ucfg.diffusion.num_timesteps))
  extras = tree["extras"]
  shift = extras.get("latent_shift", np.zeros(loaded_vae.latent_channels, np.float32))
  return unet, sched, loaded_vae, extras["ema"], extras["scale_factor"], shift, ucfg


class SampleStage(base.Task):
  """Samples `sample.num_images` images with the UNet's EMA weights and decodes them."""

  def run(self, workdir: pathlib.Path) -> dict:
    c = self.config
    unet, sched, loaded_vae, params, scale, shift, ucfg = load_latent_model(c.unet_from,
                                                                             c.vae_from)
    with ucfg.unlocked():
      ucfg.sample = c.sample
      ucfg.mesh = c.mesh
    num = int(c.sample.num_images)
    images = common.sample_images(unet, sched, loaded_vae, params, float(scale), shift, ucfg,
                                  num=num, seed=int(c.seed), num_steps=int(c.sample.steps),
                                  sampler=c.sample.sampler, progress=True)
    root = pathlib.Path(workdir) / "images"
    arrays.write_image_folder(images, root)
    grid = fig_lib.image_grid(images[:32], pathlib.Path(workdir) / "samples" / "grid.png",
                              nrow=8)
    steps = int(c.sample.steps) if c.sample.sampler == "ddim" else sched.num_timesteps
    result = {"num_images": num, "sampler_steps": steps,
              "pixel_mean": float(np.mean(images)), "pixel_std": float(np.std(images))}
    report_lib.write_report(
        workdir, c, result, {"samples": os.path.relpath(grid, workdir)},
        [f"Synthetic dataset: `{root}` (read it with `data.name=image_folder`, "
         f"`data.root={root}`), sampler {c.sample.sampler} with {steps} steps."])
    return result
