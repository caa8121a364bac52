"""Linear evaluation of a frozen encoder at several label fractions (CAMContrast Table 8).

The encoder of `encoder_from` (any run with an `encoder` subtree) embeds the train split
and the held-out `eval.split` of `config.data` once (`eval.feature_nets.encoder_features`:
GAP of the last feature map). For each label fraction, a class-stratified subset of the
train features (`data.subsets.label_fraction`, seeded) fits a logistic-regression probe
(`eval.probes.linear_probe`, L-BFGS on standardized features), which is scored on the
held-out split: AUC-ROC (binary, or macro one-vs-rest) and accuracy.

`eval.protocol="sgd"` swaps the L-BFGS probe for the papers' linear-evaluation protocol
(`eval.probes.sgd_linear_probe`: SGD with momentum `eval.sgd.momentum`, weight decay
`eval.sgd.weight_decay`, `eval.sgd.epochs` epochs of batch `eval.sgd.batch_size`, one run
per LR of `eval.sgd.lrs`). The LR is chosen on `eval.val_split` (all of it, at every label
fraction), which must differ from `eval.split`; the chosen probe's `eval.split` scores are
the headline, and the chosen LR (`lr_<pct>`) and every LR's validation accuracy
(`val_accuracy_<pct>_lr<lr>`) are metrics and a report table.

With `eval.embedding` the stage also draws a t-SNE map (`medrep_jax.eval.embedding.tsne`) of the
frozen `eval.split` features, at most `eval.embedding_max_points` of them (a seeded random
draw), coloured by label: `figures/embedding_tsne.png` (DCL-CsTP Fig. 6, CAMContrast Fig. 8).

Both probes fit on features computed once (no augmentation): "lbfgs" is the fast protocol,
"sgd" the paper's optimizer and LR selection on them; the full protocol (a linear layer
trained by SGD on the frozen encoder, with augmentation) is `finetune` with
`freeze_encoder=True` and `label_fraction` (configs/pipeline_camcontrast.py, linear=finetune).
"""
from __future__ import annotations

import os

import numpy as np

from medrep_jax import methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.data import loader, subsets
from medrep_jax.eval import embedding as embedding_lib
from medrep_jax.eval import figures as fig_lib
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
    protocol = str(e.get("protocol", "lbfgs"))
    if protocol not in ("lbfgs", "sgd"):
      raise ConfigError(f"eval.protocol must be 'lbfgs' or 'sgd'; got {protocol!r}")
    val_split = str(e.get("val_split", "val"))
    if protocol == "sgd" and val_split == str(e.split):
      raise ConfigError(f"eval.protocol='sgd' picks the LR on eval.val_split, which must not "
                       f"be the scored eval.split ({e.split!r} both)")
    source, x_train, y_train = self._split("train")
    _, x_test, y_test = self._split(e.split)
    f_train, f_test = embed(x_train), embed(x_test)
    if protocol == "sgd":
      _, x_val, y_val = self._split(val_split)
      f_val = embed(x_val)
    num_classes = int(source.info.num_classes)
    result: dict[str, float] = {"feature_dim": int(f_train.shape[1])}
    sgd_rows = []
    for fraction in e.label_fractions:
      keep = subsets.label_fraction(source, float(fraction), seed=int(c.seed),
                                    labels=y_train).indices
      name = fraction_name(float(fraction))
      if protocol == "lbfgs":
        probe = probes.linear_probe(f_train[keep], y_train[keep], f_test, y_test,
                                    num_classes=num_classes, epochs=int(e.probe_epochs),
                                    weight_decay=float(e.weight_decay), seed=int(c.seed))
      else:  # the LR is chosen on the val split; the test split is only scored
        s = e.sgd
        chosen = probes.sgd_linear_probe(
            f_train[keep], y_train[keep], f_val, y_val, lrs=tuple(s.lrs),
            epochs=int(s.epochs), batch_size=int(s.batch_size), momentum=float(s.momentum),
            weight_decay=float(s.weight_decay), seed=int(c.seed), num_classes=num_classes)
        probe = chosen.score(f_test, y_test)
        result[f"lr_{name}"] = chosen.lr
        for lr, scores in chosen.val_scores.items():
          result[f"val_accuracy_{name}_lr{lr:g}"] = scores["accuracy"]
        sgd_rows.append(f"| {100 * float(fraction):g}% | {chosen.lr:g} | " + " | ".join(
            f"{100 * chosen.val_scores[float(lr)]['accuracy']:.2f}" for lr in s.lrs) + " |")
      result[f"auc_{name}"] = probe["auc"]
      result[f"accuracy_{name}"] = probe["accuracy"]
      result[f"num_labels_{name}"] = int(len(keep))
    names = [fraction_name(float(f)) for f in e.label_fractions]
    header = [f"{100 * float(f):g}%" for f in e.label_fractions]
    table = ["| encoder | " + " | ".join(header) + " |", "|---|" + "---|" * len(names),
             f"| `{c.encoder_from}` | "
             + " | ".join(f"{100 * result[f'auc_{n}']:.2f}" for n in names) + " |"]
    lines = [f"## Linear evaluation ({e.split} split, AUC-ROC %, frozen features, "
             f"{protocol} probe)", "", *table]
    if sgd_rows:
      lrs = [f"{float(lr):g}" for lr in e.sgd.lrs]
      lines += ["", f"SGD probe: learning rate chosen on the `{val_split}` split "
                f"(validation accuracy % per LR):", "",
                "| labels | chosen lr | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                "|---|---|" + "---|" * len(lrs), *sgd_rows]
    figures = {}
    if e.get("embedding", True) and self.workdir is not None and len(f_test) >= 4:
      figures["t-SNE of frozen features"] = self._embedding_figure(f_test, y_test, source)
    return base.Result(result, figures, lines)

  def _embedding_figure(self, feats: np.ndarray, labels: np.ndarray, source) -> str:
    """t-SNE of (a seeded draw of at most `eval.embedding_max_points`) features -> PNG."""
    c, e = self.config, self.config.eval
    n = len(feats)
    keep = np.arange(n)
    limit = int(e.get("embedding_max_points", 2000))
    if 0 < limit < n:
      keep = np.sort(np.random.default_rng(int(c.seed)).choice(n, limit, replace=False))
    points = embedding_lib.tsne(feats[keep],
                                perplexity=float(e.get("embedding_perplexity", 30.0)),
                                iterations=int(e.get("embedding_iterations", 1000)),
                                seed=int(c.seed))
    path = fig_lib.embedding_figure(
        points, labels[keep], tuple(source.info.class_names),
        self.workdir / "figures" / "embedding_tsne.png",
        title=f"t-SNE of frozen encoder features: {c.data.name}, {e.split} split "
              f"({len(keep)} images)")
    return os.path.relpath(path, self.workdir)
