"""DRFL stage `teacher`: the SR teacher whose outputs are the SR stream's targets.

Sec. 3.1.2: a super-resolution network (WSISR in the paper; here the small
`models.drfl.SRTeacher`) is trained on the training images downsampled to 1/2 (input)
against the originals (target), with the L1 loss of eq. 4. Then, as in knowledge
distillation, its 2x outputs on the original training images are the SR targets g_sr of
the `train` stage: they are written once, after the final evaluation, to
WORKDIR/sr_targets_train.npz (with a fingerprint of each image, so a run on other data
fails loudly). A finished teacher is skipped on a re-run and its cache reused.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.data import transforms as transforms_lib
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import metrics as eval_metrics
from medrep_jax.losses import drfl as drfl_losses
from medrep_jax.methods import base
from medrep_jax.methods.drfl_parts import common
from medrep_jax.models import drfl as drfl_model


def build_teacher(config):
  """`SRTeacher` from `config.teacher` (a run's config alone rebuilds it)."""
  return drfl_model.SRTeacher(**dict(config.teacher), dtype=jnp.dtype(config.dtype))


class TeacherStage(base.Method):
  """Trains the SR teacher (1/2-size input -> original, L1) and caches its 2x outputs."""

  @functools.cached_property
  def model(self):
    return build_teacher(self.config)

  def init_variables(self, rng, batch):
    return self.model.init(rng, common.half(batch["image"]), train=False)

  def loss_fn(self, params, state, batch, rng):
    if self.config.augment:
      batch = common.flip_rotate(rng, batch, keys=("image",))
    x = batch["image"]
    out, updates = self.model.apply({"params": params, **state.model_state},
                                    common.half(x), train=True, mutable=["batch_stats"])
    loss = drfl_losses.sr_loss(out, x)  # eq. 4 against the original
    return loss, {"metrics": {"psnr": jnp.mean(eval_metrics.psnr(jnp.clip(out, 0, 1), x))},
                  "updates": updates}

  def upscale(self, variables, images: jax.Array) -> jax.Array:
    """The teacher's 2x output of `images` (B, H, W, C) in [0, 1]: (B, 2H, 2W, C)."""
    return jnp.clip(self.model.apply(variables, images, train=False), 0.0, 1.0)

  def eval_step(self, state, batch):
    x = batch["image"]
    low = common.half(x)
    return {"psnr_teacher": eval_metrics.psnr(self.upscale(state.variables(), low), x),
            "psnr_bicubic": eval_metrics.psnr(common.bicubic_2x(low), x),
            "index": batch["index"]}

  def evaluate(self, outputs, state, ctx):
    metrics = {k: float(np.mean(outputs[k])) for k in ("psnr_teacher", "psnr_bicubic")}
    if not ctx.final:
      return base.Result(metrics)
    figs = {"teacher SR samples (input | bicubic | teacher | original)":
            self._figure(outputs["index"][:6], state, ctx)}
    n = self.write_targets(state.variables())
    lines = [f"SR targets: the teacher's 2x outputs of the {n} training images are in "
             f"`{self.workdir / common.CACHE_NAME}` (the `train` stage reads them with "
             f"`teacher_from` set to this run)."]
    return base.Result({**metrics, "num_sr_targets": n}, figs, lines)

  def write_targets(self, variables) -> int:
    """Writes (or keeps, when present and of the same images) the 2x targets of every
    training image; returns their number."""
    path = self.workdir / common.CACHE_NAME
    fn = jax.jit(functools.partial(self.upscale, variables))
    source, tfs = super().make_source("train"), self.transforms("train")
    if path.exists():
      _, fps = common.map_source(lambda x: x[:, :1, :1], source, tfs,
                                 int(self.config.train.eval_batch_size))
      size = int(self.config.data.image_size)
      if common.load_targets(path, fps, (size, size)) is not None:
        return len(fps)
    sr, fps = common.map_source(fn, source, tfs, int(self.config.train.eval_batch_size))
    common.save_targets(path, sr, fps)
    return len(sr)

  def _figure(self, indices, state, ctx) -> str:
    source, tfs = self.make_source(ctx.split), self.transforms(ctx.split)
    x = np.stack([transforms_lib.apply_transforms(source[int(i)], tfs)["image"]
                  for i in indices])
    low = common.half(jnp.asarray(x))
    up = lambda a: np.asarray(jax.image.resize(a, (a.shape[0], *x.shape[1:]), "nearest"))
    teacher = np.asarray(jax.jit(self.upscale)(state.variables(), low))
    bicubic = np.asarray(common.bicubic_2x(low))
    # Rows of equal-size cells: the 1/2 input (shown enlarged), bicubic, teacher, original.
    rows = [up(low), bicubic, teacher, x]
    titles = [t for t in ("input 1/2", "bicubic", "teacher", "original") for _ in indices]
    path = fig_lib.image_grid(np.concatenate(rows), ctx.figures_dir / "teacher_sr.png",
                              nrow=len(indices), titles=titles)
    return os.path.relpath(path, ctx.workdir)
