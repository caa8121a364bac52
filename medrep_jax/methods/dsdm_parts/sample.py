"""DSDM stage `sample`: K images for each mask, in the style of a reference image.

Masks: the `sample.mask_split` split of the data (the paper generates from every training
mask, Sec. V-A1), or the PNG class-id masks in `sample.mask_dir`. References
(`sample.reference`): "other" takes each mask's reference from another image of the split
(a fixed derangement), "self" the mask's own image, or a path to an image file or folder
(cycled over the masks). The sampler, steps and guidance scale s (eq. 17) come from
`sample`. Output: WORKDIR/images/{images,masks}/ (`dsdm_parts.synthetic`), which the
`filter` and `seg` stages read, and a grid figure (mask | reference | K samples).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from medrep_jax import methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.data import imageio, loader
from medrep_jax.data import transforms as transforms_lib
from medrep_jax.eval import figures as fig_lib
from medrep_jax.methods import base
from medrep_jax.methods.dsdm_parts import generator, synthetic


def _read_masks(folder: str, tfs: list, channels: int) -> np.ndarray:
  """Class-id masks of a folder, padded/resized like the data (nearest)."""
  files = imageio.list_images(pathlib.Path(folder))
  if not files:
    raise ConfigError(f"sample.mask_dir {folder} holds no mask images")
  out = []
  for f in files:
    mask = imageio.decode_mask(f, grey=True)
    rec = {"image": np.zeros(mask.shape[:2] + (channels,), np.uint8), "mask": mask}
    out.append(transforms_lib.apply_transforms(rec, tfs)["mask"])
  return np.stack(out).astype(np.int32)


def _read_references(path: str, tfs: list, channels: int) -> np.ndarray:
  p = pathlib.Path(path)
  files = imageio.list_images(p) if p.is_dir() else [p]
  if not files or not files[0].exists():
    raise ConfigError(f"sample.reference {path}: no image there (give 'other', 'self', an "
                      f"image file or a folder of images)")
  return np.stack([transforms_lib.apply_transforms(
      {"image": imageio.decode_image(f, channels)}, tfs)["image"] for f in files])


class SampleStage(base.Task):
  """Samples `sample.num_per_mask` images per mask with the generator's EMA weights."""

  def preflight(self, planned):
    """WORKDIR/images/ will hold (masks x num_per_mask) pairs."""
    s = self.config.sample
    if s.mask_dir:
      num = 0 if base.pending(str(s.mask_dir), planned) else len(
          imageio.list_images(pathlib.Path(s.mask_dir)))
    else:
      num = len(self.make_source(str(s.mask_split)))
    if int(s.max_masks) > 0:
      num = min(num, int(s.max_masks))
    return {str(self.workdir / "images"): num * int(s.num_per_mask)}

  def run(self) -> base.Result:
    c, s, workdir = self.config, self.config.sample, self.workdir
    trained = methods.load_trained(c.generator_from, method="dsdm", stage="generator")
    gen = trained.stage
    gen.mesh = self.mesh
    tfs = self.transforms(str(s.mask_split))
    data = loader.collect(self.make_source(str(s.mask_split)), tfs,
                          limit=int(s.max_masks))
    masks = (_read_masks(s.mask_dir, tfs, self.channels) if s.mask_dir
             else np.asarray(data["mask"], np.int32))
    if s.reference == "other":
      refs = data["image"][generator.derangement(len(data["image"]), int(c.seed))]
    elif s.reference == "self":
      if s.mask_dir:
        raise ConfigError("sample.reference='self' needs the split's masks, not mask_dir")
      refs = data["image"]
    else:
      refs = _read_references(str(s.reference), tfs, self.channels)
    refs = refs[np.arange(len(masks)) % len(refs)]
    k = int(s.num_per_mask)
    rows = np.repeat(np.arange(len(masks)), k)
    embeds = gen.embed(refs) if gen.use_ref else None
    images = gen.sample(trained.run.extras["ema"], masks=masks[rows],
                        refs=None if embeds is None else embeds[rows], num=len(rows),
                        seed=int(c.seed), guidance_scale=float(s.guidance_scale),
                        progress=True)
    root = workdir / "images"
    synthetic.write(images, masks[rows], root)
    grid = self._grid(workdir, masks, refs, images, k)
    result = {"num_images": len(images), "num_masks": len(masks), "num_per_mask": k,
              "guidance_scale": float(s.guidance_scale),
              "pixel_mean": float(images.mean()), "pixel_std": float(images.std())}
    return base.Result(result, {"mask | reference | samples": grid}, [
        f"Synthetic dataset: `{root}` ({len(images)} image+mask pairs; read it with "
        f"`data.name=image_mask_folder`, `data.root={root}`, `data.mask_threshold=-1`). "
        f"Generator `{trained.run.path}` (variant {trained.config.variant}), "
        f"{gen.config.sample.sampler}-{gen.config.sample.steps}, s = {s.guidance_scale}."])

  @staticmethod
  def _grid(workdir, masks, refs, images, k) -> str:
    rows = min(6, len(masks))
    tiles, titles = [], []
    for i in range(rows):
      tiles += [fig_lib.overlay_mask(np.zeros(masks[i].shape + (1,)), masks[i]),
                fig_lib.to_display(refs[i])] + [fig_lib.to_display(x)
                                                for x in images[i * k:(i + 1) * k]]
      titles += ["mask", "reference"] + [f"sample {j + 1}" for j in range(k)]
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in tiles]
    path = fig_lib.image_grid(np.stack(tiles), workdir / "figures" / "samples.png",
                              nrow=k + 2, titles=titles,
                              value_ranges=[(0.0, 1.0)] * len(tiles))
    return os.path.relpath(path, workdir)
