"""LDM stage `sample`: N synthetic images written as a dataset the data layer reads.

Images go to WORKDIR/images/synthetic/*.png, an `image_folder` dataset
(`data.name=image_folder, data.root=WORKDIR/images`), and a grid to WORKDIR/samples/.
The sampler is DDPM with all T steps (as in the paper) or DDIM with a few dozen steps.
"""
from __future__ import annotations

import os

import numpy as np

from medrep_jax import methods
from medrep_jax.data import arrays
from medrep_jax.eval import figures as fig_lib
from medrep_jax.methods import base


class SampleStage(base.Task):
  """Samples `sample.num_images` images with the UNet's EMA weights and decodes them."""

  def preflight(self, planned):
    return {str(self.workdir / "images"): int(self.config.sample.num_images)}

  def run(self) -> base.Result:
    c, workdir = self.config, self.workdir
    trained = methods.load_trained(c.unet_from, method="ldm", stage="unet")
    unet = trained.stage
    unet.mesh = self.mesh
    num = int(c.sample.num_images)
    images = unet.sample(trained.run.extras, num=num, seed=int(c.seed),
                         num_steps=int(c.sample.steps), sampler=c.sample.sampler,
                         sample_cfg=c.sample, progress=True)
    root = workdir / "images"
    arrays.write_image_folder(images, root)
    grid = fig_lib.image_grid(images[:32], workdir / "samples" / "grid.png", nrow=8)
    steps = int(c.sample.steps) if c.sample.sampler == "ddim" else unet.sched.num_timesteps
    result = {"num_images": num, "sampler_steps": steps,
              "pixel_mean": float(np.mean(images)), "pixel_std": float(np.std(images))}
    return base.Result(result, {"samples": os.path.relpath(grid, workdir)}, [
        f"Synthetic dataset: `{root}` (read it with `data.name=image_folder`, "
        f"`data.root={root}`), sampler {c.sample.sampler} with {steps} steps."])
