"""DSDM stage `probe`: which decoder blocks, at which t, segment best (paper 004, Fig. 3).

For every t in `probe.timesteps` the frozen DSDM runs once over the probe images (train
then test) and returns every decoder block's features; a pixel classifier
(`eval.feature_probe`) is fitted per block on the train part and scored (mIoU over all
classes, background included) on the test part. The heatmap over blocks x t is the
figure of Fig. 3. The extraction is one jitted function of (images, t, noise) for the
whole block set, compiled once for every t.

The condition (`probe.condition`): "null" (default) is what the segmentation stage sees
at test time; "dual" feeds the true mask as well, as Fig. 3's caption says, which lets
the features carry the label the probe predicts (read that row of results with care).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax import methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.data import loader
from medrep_jax.eval import feature_probe
from medrep_jax.eval import figures as fig_lib
from medrep_jax.methods import base
from medrep_jax.methods.dsdm_parts import common
from medrep_jax.models import feature_fusion


class ProbeStage(base.Task):
  """Fits the block x timestep pixel probes and writes the Fig. 3 heatmap."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    if config.probe.condition not in ("null", "dual"):
      raise ConfigError(f"probe.condition={config.probe.condition!r}; expected 'null' or "
                        f"'dual'")

  @functools.cached_property
  def generator(self) -> methods.Trained:
    if not self.config.generator_from:
      raise ConfigError("generator_from is empty: point it at a finished dsdm "
                        "stage=generator run (in the pipeline: 'stage:generator')")
    return methods.load_trained(self.config.generator_from, method="dsdm", stage="generator")

  def blocks(self) -> list[str]:
    m = self.generator.stage.model
    names = feature_fusion.decoder_block_names(m.channel_mult, m.num_res_blocks)
    asked = list(self.config.probe.blocks) or names
    unknown = [b for b in asked if b not in names]
    if unknown:
      raise ConfigError(f"probe.blocks {unknown} do not exist; the generator's decoder "
                        f"blocks are {names}")
    return asked

  @functools.cached_property
  def extract_fn(self):
    """jit((params, images [0, 1], masks, t, keys) -> {block: features}): one compile."""
    gen, dual = self.generator.stage, self.config.probe.condition == "dual"

    def extract(params, images, masks, t, keys):
      x0 = images * 2.0 - 1.0
      noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(keys)
      tt = jnp.full((x0.shape[0],), t, jnp.int32)
      feats = common.diffusion_features(gen, params, x0, tt, noise, ref=self._ref(images),
                                        masks=masks if dual else None)
      return feats

    return jax.jit(extract)

  def _ref(self, images):
    gen = self.generator.stage
    if not gen.use_ref:
      return None
    trained = self._encoder
    return trained.model.encoder.apply(trained.run.variables("encoder"), images,
                                       train=False)["pooled"]

  @functools.cached_property
  def _encoder(self):
    return methods.load_trained(self.generator.config.ref_encoder_from)

  def run(self) -> base.Result:
    c, p = self.config, self.config.probe
    blocks = self.blocks()
    gen = self.generator.stage
    k = max(2, int(gen.num_mask_classes))
    split_data = {}
    for split, limit in (("train", p.max_train), ("test", p.max_test)):
      got = loader.collect(self.make_source(split), self.transforms(split), limit=int(limit))
      split_data[split] = {"image": got["image"], "mask": got["mask"].astype(np.int32)}
    params = self.generator.run.extras["ema"]
    batch = int(p.batch_size)

    def extract(images, t):
      out: dict[str, list] = {b: [] for b in blocks}
      n = len(images)
      masks = np.concatenate([split_data["train"]["mask"], split_data["test"]["mask"]])
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(c.seed)), i))(
          jnp.arange(n))
      for s in range(0, n, batch):
        idx = np.arange(s, min(n, s + batch))
        pad = np.concatenate([idx, np.repeat(idx[-1:], batch - len(idx))])
        feats = self.extract_fn(params, jnp.asarray(images[pad]), jnp.asarray(masks[pad]),
                                int(t), keys[pad])
        for b in blocks:
          out[b].append(np.asarray(feats[b], np.float32)[:len(idx)])
      return {b: np.concatenate(v) for b, v in out.items()}

    steps = [int(t) for t in p.timesteps]
    bad = [t for t in steps if not 0 <= t < gen.sched.num_timesteps]
    if bad:
      raise ConfigError(f"probe.timesteps {bad} outside [0, {gen.sched.num_timesteps})")
    grid, _ = feature_probe.probe_grid(
        extract, blocks, steps, split_data["train"], split_data["test"], k,
        hidden=int(p.hidden), steps=int(p.steps), lr=float(p.lr), seed=int(c.seed))
    path = fig_lib.probe_heatmap_figure(
        grid, blocks, steps, self.workdir / "figures" / "probe.png",
        title=f"pixel-probe mIoU ({p.condition} condition)")
    best = np.unravel_index(np.nanargmax(grid), grid.shape)
    metrics = {"best_miou": float(grid[best]), "best_t": float(steps[best[1]])}
    table = ["| block | " + " | ".join(f"t={t}" for t in steps) + " |",
             "|---|" + "---|" * len(steps)]
    table += [f"| {b} | " + " | ".join(f"{v:.3f}" for v in grid[i]) + " |"
              for i, b in enumerate(blocks)]
    np.save(self.workdir / "probe_grid.npy", grid)
    return base.Result(metrics, {"mIoU over blocks x t": os.path.relpath(path, self.workdir)}, [
        "## Block x timestep probe (Fig. 3)", "",
        f"Best: {blocks[best[0]]} at t = {steps[best[1]]} (mIoU {grid[best]:.3f}). Probe: "
        f"{'linear' if int(p.hidden) == 0 else f'MLP (hidden {p.hidden})'} per pixel, "
        f"{p.steps} Adam steps, {len(split_data['train']['image'])} train / "
        f"{len(split_data['test']['image'])} test images, {p.condition} semantic condition; "
        f"mIoU over {k} classes including background.", ""] + table)
