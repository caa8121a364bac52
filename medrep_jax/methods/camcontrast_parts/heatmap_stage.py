"""CAMContrast between the stages: heatmaps from the frozen classifier, then the crop dataset.

Algorithm 1, line 7 and Sec. 3.1: the stage-1 classifier's abnormal-class CAMs (eq. 1) are
min-max normalized at feature-map resolution, suppressed (negatives, background), and
every image and heatmap is cut into the fixed crops (`crops.py`). The crop dataset is
generated once, before stage 2, as WORKDIR/crops_<split>.npz (an `arrays.ArraySource`):

  image         (N, H', W', C) uint8   image crops ((N, D', H', W', C) for volumes)
  heatmap       (N, h', w', 1) float32 heatmap crops in [0, 1] ((N, d', h', w', 1))
  label         (N,) int32             coarse label of the source image (0 normal, 1 abnormal)
  source_label  (N,) or (N, K)         the dataset's own label of the source image
  source_index  (N,) int64             index of the source image in the split
  position      (N,) int32             index into the manifest's "positions" (-1: uncropped)

with WORKDIR/manifest.json (strategy, positions, sizes, stride, switches) and a heatmap
figure (normal and abnormal examples, before and after suppression; for volumes, Sec. 4.7,
axial / coronal / sagittal slices through each heatmap's peak, `figures/heatmaps.png`
after suppression and `figures/heatmaps_raw.png` before).
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.config_lib import ConfigError
from medrep_jax.data import arrays
from medrep_jax.data.sources import DataError, SourceInfo
from medrep_jax.eval import figures as fig_lib
from medrep_jax.methods import base
from medrep_jax.methods.camcontrast_parts import classifier_stage, common, crops, heatmaps
from medrep_jax.models import cam as cam_lib

MANIFEST = "manifest.json"


def load_crops(crops_dir: str | pathlib.Path, split: str = "train"):
  """(ArraySource of crops_<split>.npz, manifest dict) of a finished heatmap stage."""
  crops_dir = pathlib.Path(crops_dir)
  path, manifest = crops_dir / f"crops_{split}.npz", crops_dir / MANIFEST
  if not path.exists() or not manifest.exists():
    raise DataError(f"no crop dataset {path} (with {MANIFEST}): point crops_from at a "
                    f"finished camcontrast stage=heatmaps run (in the pipeline: "
                    f"'stage:heatmaps') that wrote split {split!r}")
  meta = json.loads(manifest.read_text())
  name = f"camcontrast_crops[{meta.get('data', crops_dir.name)}]"
  info = SourceInfo(name=name, num_classes=2, class_names=common.CLASS_NAMES,
                    channels=int(meta["channels"]))
  return arrays.ArraySource.load(path, info), meta


def write_crops(workdir: str | pathlib.Path, split: str, images: np.ndarray,
                heat: np.ndarray, labels: np.ndarray, index: np.ndarray, *, strategy: str,
                normal_class: int = 0, **meta) -> dict:
  """Cuts images and heatmaps (`crops.fixed_crops`) and writes crops_<split>.npz + manifest.

  Args:
    workdir: output folder.
    split: the split name in the file name.
    images: (N, H, W, C) uint8 images, or (N, D, H, W, C) volumes.
    heat: (N, h, w) heatmaps (after suppression), or (N, d, h, w) for volumes.
    labels: (N,) dataset labels or (N, K) multi-hot labels of the images.
    index: (N,) indices of the images in their split.
    strategy: a `crops.STRATEGIES` entry.
    normal_class: the dataset label that is "normal".
    **meta: extra manifest entries (data name, classifier run, switches).

  Returns:
    The manifest (also written to workdir/manifest.json), with "num_crops".
  """
  cut = crops.fixed_crops(images, heat, strategy)
  src = cut["source"]
  coarse = common.coarse_labels(np.asarray(labels)[src], normal_class)
  data = {"image": cut["image"], "heatmap": cut["heatmap"],
          "label": (~heatmaps.is_normal(coarse)).astype(np.int32),
          "source_label": np.asarray(labels)[src], "source_index": np.asarray(index)[src],
          "position": cut["position"]}
  channels = int(images.shape[-1])
  workdir = pathlib.Path(workdir)
  arrays.ArraySource(data, SourceInfo("crops", 2, common.CLASS_NAMES, channels)
                     ).save(workdir / f"crops_{split}.npz")
  manifest = {**meta, "strategy": strategy, "positions": _positions(strategy, heat.ndim - 1),
              "stride": crops.heatmap_stride(images.shape[1:-1], heat.shape[1:]),
              "image_size": list(images.shape[1:-1]),
              "crop_size": list(cut["image"].shape[1:-1]), "heatmap_size": list(heat.shape[1:]),
              "heatmap_crop_size": list(cut["heatmap"].shape[1:-1]), "channels": channels,
              "num_crops": int(len(src))}
  (workdir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
  return manifest


def _positions(strategy: str, rank: int) -> tuple[str, ...]:
  """The crop names a "position" id indexes; whole-image strategies ("none", "random",
  position -1) record the fixed names of their rank (2-D: `crops.POSITIONS`)."""
  if strategy in crops.FIXED:
    return crops.positions(strategy)
  return crops.POSITIONS if rank == 2 else crops.POSITIONS_3D


class HeatmapStage(base.Task):
  """Writes the crop dataset(s) of `config.heatmap.splits` and the heatmap figure."""

  def preflight(self, planned: dict[str, int]) -> dict[str, int]:
    """The fixed crops against the heatmap the classifier's encoder gives at this input
    size (traced abstractly): the crops halve the heatmap, so its sides must be even and at
    least 2, which fails here, before stage 1 trains, not after it."""
    del planned
    c = self.config
    strategy = str(c.crops.strategy)
    if strategy not in crops.FIXED:
      return {}
    rank = crops.FIXED[strategy][0]
    spatial = (tuple(int(n) for n in c.data.get("volume_size", ()) or ()) if rank == 3
               else (int(c.data.image_size),) * 2)
    if len(spatial) != rank or min(spatial, default=0) <= 0:
      return {}  # the stage itself reports a volume/image mismatch with its data
    x = jax.ShapeDtypeStruct((1, *spatial, self.channels), jnp.float32)
    encoder = common.encoder_of(c)
    feats = jax.eval_shape(lambda v: encoder.init_with_output(jax.random.key(0), v, False)[0], x)
    heat = tuple(int(n) for n in cam_lib.last_feature_map(feats).shape[1:-1])
    try:
      crops.crop_boxes(heat, strategy)
    except ValueError as e:
      field = "data.volume_size" if rank == 3 else "data.image_size"
      stride = max(spatial[-1] // max(heat[-1], 1), 1)
      m = 2 * stride  # even heatmap sides of at least 2
      near = sorted({max(2 * m, n // m * m) for n in spatial} | {max(2 * m, -(-n // m) * m)
                                                                  for n in spatial})
      raise ConfigError(
          f"crops.strategy={strategy!r} cannot cut the {heat} heatmap that "
          f"model.encoder={c.model.encoder!r} gives at "
          f"{field}={spatial if rank == 3 else spatial[0]} (total stride {stride}): {e}. "
          f"Every side must be a multiple of {m} (e.g. {' or '.join(map(str, near))}), or use "
          f"a shallower encoder") from e
    return {}

  def run(self) -> base.Result:
    c, workdir = self.config, self.workdir
    classifier = common.load_classifier(c.classifier_from)
    self.fn = common.map_fn(classifier.model.encoder, weighted=bool(c.heatmap.weighted))
    self.variables = classifier.variables
    result = {}
    for split in c.heatmap.splits:
      got, coarse, hm = self._heatmaps(split)
      result.update(_stats(got, coarse, hm, split))
      keep = np.ones(len(coarse), bool)
      if c.heatmap.discard_negatives:  # Table 4, "discard all negatives"
        keep = ~heatmaps.is_normal(coarse)
      u8 = np.clip(np.round(got["image"][keep] * 255.0), 0, 255).astype(np.uint8)
      meta = write_crops(workdir, split, u8, hm["heatmap"][keep], got["label"][keep],
                         got["index"][keep], strategy=c.crops.strategy,
                         normal_class=int(c.coarse.normal_class), data=c.data.name,
                         classifier_from=str(c.classifier_from),
                         options={k: c.heatmap[k] for k in c.heatmap if k != "splits"})
      result[f"{split}/num_crops"] = meta["num_crops"]
    figure = self._figure(workdir)
    return base.Result(result, {"heatmaps": figure}, [
        f"Crop dataset: `{workdir}/crops_<split>.npz` ({c.crops.strategy} crops), "
        f"manifest `{MANIFEST}`."])

  def _heatmaps(self, split: str, limit: int = 0):
    """(collected maps, coarse labels, `heatmaps.make_heatmaps` output) of a split."""
    c = self.config
    got = common.collect_maps(self.fn, self.variables, self.make_source(split),
                              self.transforms(split), batch_size=int(c.train.eval_batch_size),
                              limit=limit)
    coarse = common.coarse_labels(got["label"], int(c.coarse.normal_class))
    hm = heatmaps.make_heatmaps(got["maps"], coarse, got["image"],
                                heatmaps.options_from_config(c.heatmap))
    return got, coarse, hm

  def _figure(self, workdir: pathlib.Path) -> str:
    c = self.config
    got, coarse, hm = self._heatmaps(c.heatmap.figure_split, limit=int(c.heatmap.figure_pool))
    rows = classifier_stage.pick_examples(coarse)
    titles = classifier_stage.column_titles(coarse[rows], got["logits"][rows])
    title = f"{c.data.name} ({c.heatmap.figure_split})"
    if got["image"].ndim == 5:  # volumes: 3 views through each heatmap's peak (Sec. 4.7)
      figures = workdir / "figures"
      fig_lib.volume_views_figure(got["image"][rows], hm["raw"][rows],
                                  figures / "heatmaps_raw.png", at="peak", names=titles,
                                  title=f"{title}: CAM heatmaps before suppression")
      path = fig_lib.volume_views_figure(got["image"][rows], hm["heatmap"][rows],
                                         figures / "heatmaps.png", at="peak", names=titles,
                                         title=f"{title}: heatmaps after suppression")
      return os.path.relpath(path, workdir)
    path = fig_lib.heatmap_overlay_grid(
        got["image"][rows], {"CAM heatmap": hm["raw"][rows], "suppressed": hm["heatmap"][rows],
                             "foreground": hm["foreground"][rows]},
        workdir / "figures" / "heatmaps.png",
        titles=titles, title=f"{title}: heatmaps before / after suppression")
    return os.path.relpath(path, workdir)


def _stats(got: dict, coarse: np.ndarray, hm: dict, split: str) -> dict[str, float]:
  """Classifier accuracy and where the (unsuppressed) heatmaps put their mass.

  `heat_in_centre_*` is the share of heatmap mass inside the centre crop's box (a quarter of
  the image): about 0.25 for a heatmap spread evenly, more when it sits on the central anatomy
  (lungs and mediastinum on a chest X-ray, the fundus on a retina photograph). On volumes
  the box is the half-size box centred on all three axes ("nine"'s centre crop, an eighth
  of the volume: about 0.125 for an even heatmap).
  `peak_in_centre_*` is the share of heatmaps whose maximum lies in that box.
  """
  normal = heatmaps.is_normal(coarse)
  out = {f"{split}/num_images": len(coarse)}
  if got["logits"].shape[-1] == 2 and coarse.ndim == 1:
    out[f"{split}/classifier_accuracy"] = float(np.mean(got["logits"].argmax(-1) == coarse))
  raw, fg = hm["raw"], hm["foreground"]
  centre = np.zeros(raw.shape[1:], np.float32)  # the centre crop's box on the heatmap grid
  try:
    box = crops.crop_boxes(centre.shape, "five" if centre.ndim == 2 else "nine")[-1]
    centre[tuple(slice(a, a + k) for a, k in zip(box[:centre.ndim], box[centre.ndim:]))] = 1.0
  except ValueError:  # a grid the fixed crops cannot halve: no centre statistics
    pass
  for name, rows in (("normal", normal), ("abnormal", ~normal)):
    if rows.any():
      out[f"{split}/mean_heat_{name}"] = float(raw[rows].mean())
      mass = max(float(raw[rows].sum()), 1e-12)
      out[f"{split}/heat_in_foreground_{name}"] = float((raw[rows] * fg[rows]).sum() / mass)
      if centre.any():
        out[f"{split}/heat_in_centre_{name}"] = float((raw[rows] * centre).sum() / mass)
        peaks = raw[rows].reshape(int(rows.sum()), -1).argmax(-1)
        out[f"{split}/peak_in_centre_{name}"] = float(centre.reshape(-1)[peaks].mean())
  out[f"{split}/foreground_fraction"] = float(fg.mean())
  return out
