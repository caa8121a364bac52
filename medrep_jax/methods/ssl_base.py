"""What self-supervised pretraining methods share: real + synthetic data, and monitors.

Data: the train split of `config.data`, plus `synthetic_ratio × len(real)` images from the
`image_folder` dataset in `config.synthetic_dir` (the `ldm` sample or filter stage output;
Table 4 of the dual-stream paper: 0, 10%, 50%, 100%). Augmentation happens on device, so
the host pipeline only decodes, resizes and scales to [0, 1].

Monitors (not in the papers; users of SSL libraries expect them): at every eval, a
cosine kNN accuracy and a linear-probe accuracy/AUC of the pooled encoder features, with a
labelled train subset as the reference and the eval split as queries.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from medrep_jax.data import loader, readers
from medrep_jax.data.sources import SourceInfo
from medrep_jax.methods import base


class MixedSource:
  """Real examples followed by synthetic ones; records keep only `image` and `index`."""

  def __init__(self, real, synthetic, num_synthetic: int):
    self.real, self.synthetic = real, synthetic
    self.num_real, self.num_synthetic = len(real), int(num_synthetic)
    self.info = SourceInfo(name=f"{real.info.name}+synthetic", num_classes=0,
                           class_names=(), channels=real.info.channels)

  def __len__(self) -> int:
    return self.num_real + self.num_synthetic

  def __getitem__(self, i: int):
    i = int(i)
    rec = self.real[i] if i < self.num_real else self.synthetic[i - self.num_real]
    return {"image": rec["image"], "index": np.int64(i)}


class PretrainMethod(base.Method):
  """Base for contrastive / self-supervised pretraining methods."""

  def make_source(self, split: str):
    source = super().make_source(split)
    if split != "train":
      return source
    ratio = float(self.config.get("synthetic_ratio", 0.0))
    if ratio > 0:
      if not self.config.synthetic_dir:
        raise ValueError("synthetic_ratio > 0 needs synthetic_dir: the images/ folder of an "
                         "`ldm` sample or filter run")
      synth = readers.ImageFolder(self.config.synthetic_dir, "all",
                                  channels=self.channels)
      n = min(len(synth), int(round(ratio * len(source))))
      if n < int(round(ratio * len(source))):
        print(f"synthetic_ratio={ratio}: only {len(synth)} synthetic images in "
              f"{self.config.synthetic_dir}; using all of them")
      source = MixedSource(source, synth, n)
    self.check_data(len(source))
    return source

  def check_data(self, train_size: int) -> None:
    """Hook for method-specific checks (e.g. memory-bank size against the data)."""

  def features(self, state, images: jax.Array) -> jax.Array:
    """(state, images (B, H, W, C) in [0, 1]) -> pooled encoder features (B, D); pure.

    The model's `features` method (pooled encoder output, inference mode)."""
    return self.model.apply(state.variables(), images, method="features")

  @functools.cached_property
  def _features_jit(self):
    # Jitted once with the state as an argument (not baked-in constants): no recompile
    # and no re-embedding of the weights at every eval.
    return jax.jit(self.features)

  def _features(self, state, split: str, limit: int):
    source = base.Method.make_source(self, split)
    if not source.info.num_classes:
      return None
    fn = functools.partial(self._features_jit, state)
    feats, labels = [], []
    bs = int(self.config.train.eval_batch_size)
    for b in loader.eval_batches(source, self.transforms(split), global_batch=bs,
                                 max_examples=limit, process_index=0, process_count=1):
      keep = b["_valid"] > 0
      feats.append(np.asarray(fn(b["image"]))[keep])
      labels.append(np.asarray(b["label"])[keep])
    return np.concatenate(feats), np.concatenate(labels)

  def evaluate_state(self, state, ctx):
    from medrep_jax.eval import probes  # pylint: disable=g-import-not-at-top
    mon = self.config.monitor
    ref = self._features(state, "train", int(mon.max_train))
    query = self._features(state, ctx.split, int(self.config.train.max_eval_examples))
    if ref is None or query is None:
      return base.Result()
    metrics = {"knn_accuracy": probes.knn_accuracy(*ref, *query, k=int(mon.knn_k))}
    probe = probes.linear_probe(*ref, *query)
    metrics.update({f"linear_probe_{k}": v for k, v in probe.items()})
    return base.Result(metrics)
