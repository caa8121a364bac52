"""What self-supervised pretraining methods share: real + synthetic data, and monitors.

Data: the train split of `config.data`, plus `synthetic_fraction` of the synthetic pool
in `config.synthetic_dir` (the `ldm` sample or filter stage output; Table 4 of the
dual-stream paper: 0, 10%, 50%, 100% of the pool, or the pool alone with
`synthetic_only`; `data.mixing`). Augmentation happens on device, so
the host pipeline only decodes, resizes and scales to [0, 1].

Monitors (not in the papers; users of SSL libraries expect them): at every eval, a
cosine kNN accuracy and a linear-probe accuracy/AUC of the pooled encoder features, with a
labelled train subset as the reference and the eval split as queries.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from medrep_jax.config_lib import ConfigError
from medrep_jax.data import loader, mixing, readers
from medrep_jax.methods import base


class PretrainMethod(base.Method):
  """Base for contrastive / self-supervised pretraining methods."""

  def _synthetic(self) -> tuple[float, float, bool]:
    """(synthetic_fraction, synthetic_per_real, synthetic_only), checked (data.mixing)."""
    c = self.config
    fraction, per_real = (float(c.get("synthetic_fraction", 0.0)),
                          float(c.get("synthetic_per_real", 0.0)))
    only = bool(c.get("synthetic_only", False))
    if (fraction > 0 or per_real > 0 or only) and not c.synthetic_dir:
      raise ConfigError("synthetic_fraction / synthetic_per_real / synthetic_only need "
                        "synthetic_dir: the images/ folder of an `ldm` sample or filter "
                        "run (in a pipeline: 'stage:filter/images')")
    return fraction, per_real, only

  def make_source(self, split: str):
    source = super().make_source(split)
    if split != "train":
      return source
    fraction, per_real, only = self._synthetic()
    if fraction > 0 or per_real > 0 or only:
      pool = readers.ImageFolder(self.config.synthetic_dir, "all", channels=self.channels)
      source = mixing.mix(source, pool, fraction=fraction, per_real=per_real, only=only,
                          seed=int(self.config.seed))
    self.check_data(len(source))
    return source

  def planned_train_size(self, planned):
    """Real + synthetic, with the pool an earlier stage will write counted at its most."""
    real = super().planned_train_size(planned)
    fraction, per_real, only = self._synthetic()
    if real is None or not (fraction > 0 or per_real > 0 or only):
      return real
    folder = str(self.config.synthetic_dir)
    if base.pending(folder, planned):
      pool = planned.get(folder)
      if not pool:
        return None
    else:
      pool = len(readers.ImageFolder(folder, "all", channels=self.channels))
    n = mixing.synthetic_count(pool, real, fraction=fraction, per_real=per_real)
    return n if only else real + n

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
