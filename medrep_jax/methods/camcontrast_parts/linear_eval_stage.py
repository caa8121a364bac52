"""Linear evaluation of a frozen encoder at several label fractions (CAMContrast Table 8).

The encoder of `encoder_from` (any run with an `encoder` subtree) embeds the train split
and the held-out `eval.split` of `config.data` once (`eval.feature_nets.encoder_features`:
GAP of the last feature map). For each label fraction, a class-stratified subset of the
train features (`data.subsets.label_fraction`, seeded) fits a logistic-regression probe
(`eval.probes.linear_probe`, L-BFGS on standardized features), which is scored on the
held-out split: AUC-ROC (binary, or macro one-vs-rest) and accuracy.

This is the fast protocol (one feature pass, no SGD); the paper's protocol (a linear
layer trained by SGD on the frozen encoder, with augmentation) is `finetune` with
`freeze_encoder=True` and `label_fraction` (configs/pipeline_camcontrast.py, linear=finetune).
"""
from __future__ import annotations


import numpy as np

from medrep_jax import methods
from medrep_jax.data import loader, subsets
from medrep_jax.eval import probes
from medrep_jax.methods import base


def fraction_name(fraction: float) -> str:
  """0.01 -> "1pct", 0.25 -> "25pct" (metric-name safe)."""
  return f"{100 * fraction:g}pct"


class LinearEvalStage(base.Task):
  """Frozen features + logistic-regression probes at `eval.label_fractions`."""

  def _split(self, split: str):
    c = self.config
    source = self.make_source(split)
    got = loader.collect(source, self.transforms(split), batch_size=int(c.train.eval_batch_size))
    labels = np.asarray(got["label"])
    if labels.ndim != 1:
      raise ValueError(f"linear_eval probes single-label data; {c.data.name!r} has labels of "
                       f"shape {labels.shape[1:]} per image. Use linear=finetune (frozen "
                       f"encoder, BCE) for multi-label data")
    return source, got["image"], labels

  def run(self) -> base.Result:
    c, e = self.config, self.config.eval
    if not c.encoder_from:
      raise ValueError("encoder_from is empty: point it at a pretraining run (in the "
                       "pipeline: 'stage:pretrain')")
    embed = methods.feature_net("encoder", c.encoder_from,
                                batch_size=int(c.train.eval_batch_size))
    source, x_train, y_train = self._split("train")
    _, x_test, y_test = self._split(e.split)
    f_train, f_test = embed(x_train), embed(x_test)
    num_classes = int(source.info.num_classes)
    result: dict[str, float] = {"feature_dim": int(f_train.shape[1])}
    for fraction in e.label_fractions:
      keep = subsets.label_fraction(source, float(fraction), seed=int(c.seed),
                                    labels=y_train).indices
      probe = probes.linear_probe(f_train[keep], y_train[keep], f_test, y_test,
                                  num_classes=num_classes, epochs=int(e.probe_epochs),
                                  weight_decay=float(e.weight_decay), seed=int(c.seed))
      name = fraction_name(float(fraction))
      result[f"auc_{name}"] = probe["auc"]
      result[f"accuracy_{name}"] = probe["accuracy"]
      result[f"num_labels_{name}"] = int(len(keep))
    names = [fraction_name(float(f)) for f in e.label_fractions]
    header = [f"{100 * float(f):g}%" for f in e.label_fractions]
    table = ["| encoder | " + " | ".join(header) + " |", "|---|" + "---|" * len(names),
             f"| `{c.encoder_from}` | "
             + " | ".join(f"{100 * result[f'auc_{n}']:.2f}" for n in names) + " |"]
    return base.Result(result, {}, [
        f"## Linear evaluation ({e.split} split, AUC-ROC %, frozen features)", "", *table])
