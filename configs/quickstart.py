"""Quickstart: what self-supervised pretraining buys, in minutes on a laptop CPU, no download.

  python -m medrep_jax.main --config configs/quickstart.py --workdir runs/quickstart

A five-stage pipeline on procedural `phantoms` (chest-radiograph-like images; classes normal,
nodule, opacity, with lesion masks):
  1. `pretrain`: a small ResNet encoder learns from the *unlabelled* training images with a
     small DCL-CsTP (global MoCo stream + local SimSiam stream + cross-scale token projection;
     configs/dcl_cstp.py);
  2. `probe` / `probe_random`: a linear classifier on the frozen encoder, from the pretrained
     weights and from random initialization, trained on a few labelled images
     (`label_fraction`);
  3. `segment` / `segment_random`: a U-Net with that encoder fine-tuned on a few labelled
     masks, from the pretrained weights and from random initialization.
WORKDIR/report.md compares each pair (same network, same labels, same schedule; only the
initialization differs) in a table and a figure (figures/comparison.png); each stage's own
report, metrics.jsonl, TensorBoard events and checkpoints are under WORKDIR/<stage>/.
Re-running skips finished stages. `colabs/quickstart.ipynb` builds the same config with
`pipeline_config`.

Variant args: size=small|tiny (small: about 3.5 minutes on a 2-core CPU; tiny: a few-step
smoke test, with at least 25% labels), data=<dataset with labels and masks> (default phantoms), label_fraction=<0..1>
(labelled share of the training split for the downstream stages, default 0.05: 102 of the
2,048 phantoms), seed=<int>. Measured numbers: docs/results/quickstart.md.
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

DEFAULTS = dict(size="small", data="phantoms", label_fraction=0.05, seed=0)
CHOICES = dict(size=("small", "tiny"), data=registry.PRESETS)
# (pretrained stage, random-init stage) pairs compared in WORKDIR/report.md.
COMPARE = (("probe", "probe_random"), ("segment", "segment_random"))


def _pretrain(data: str, size: str, seed: int) -> mlc.ConfigDict:
  c = config_lib.config_module("dcl_cstp").dcl_cstp_config(data=data, size=size, seed=seed)
  if size == "small":  # configs/dcl_cstp.py's small network, on this pipeline's schedule
    c.loss.bank_size = 512
    c.optim.lr = 0.06
    c.train.update(dict(batch_size=64, num_steps=150, log_every=25, checkpoint_every=150))
  return c


def _downstream(task: str, pre: mlc.ConfigDict, *, data: str, size: str, pretrained: bool,
                label_fraction: float, seed: int) -> mlc.ConfigDict:
  """A few-label fine-tuning (segmentation) or linear probe (classification) of the
  pretraining run's encoder, or of the same encoder from random initialization."""
  c = config_lib.config_module("finetune").finetune_config(
      task=task, data=data, size=size, encoder=pre.model.encoder,
      init_from="stage:pretrain" if pretrained else "", freeze=task == "classification",
      label_fraction=label_fraction, seed=seed)
  c.model.small_input = pre.model.small_input
  c.data.image_size = pre.data.image_size
  if size == "small":
    steps = 150 if task == "classification" else 300
    c.train.update(dict(num_steps=steps, batch_size=32 if task == "classification" else 16,
                        log_every=25, eval_every=0, checkpoint_every=steps,
                        max_eval_examples=256))
    if task == "segmentation":
      c.optim.update(dict(lr=1e-3, warmup_fraction=0.05))
  return c


def pipeline_config(*, size: str = "small", data: str = "phantoms",
                    label_fraction: float = 0.05, seed: int = 0) -> mlc.ConfigDict:
  """An unlocked pipeline config: pretrain, then each downstream task from pretrained and
  from random weights."""
  if size == "tiny":  # a smoke test: enough labelled images for one batch per device
    label_fraction = max(label_fraction, 0.25)
  pre = _pretrain(data, size, seed)
  stages = {"pretrain": pre}
  for task, name in (("classification", "probe"), ("segmentation", "segment")):
    for pretrained, suffix in ((True, ""), (False, "_random")):
      stages[name + suffix] = _downstream(task, pre, data=data, size=size,
                                          pretrained=pretrained,
                                          label_fraction=label_fraction, seed=seed)
  config = config_lib.pipeline(stages)
  config.compare = COMPARE
  config.compare_labels = ("pretrained", "random init")
  return config


def get_config(arg: str = "") -> mlc.ConfigDict:
  return pipeline_config(**config_lib.parse_variant(arg, DEFAULTS, CHOICES)).lock()
