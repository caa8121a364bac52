"""The quickstart pipeline: classify phantoms, then segment them from the classifier's encoder.

Used by `configs/quickstart.py` and `colabs/quickstart.ipynb`.
"""
from __future__ import annotations

import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.presets.finetune import finetune_config


def quickstart_config(size: str = "small", data: str = "phantoms",
                      seed: int = 0) -> mlc.ConfigDict:
  """An unlocked two-stage pipeline config: `classify` then `segment`.

  Args:
    size: "small" (a few minutes on a 2-core CPU) or "tiny" (a 2-step smoke test).
    data: dataset name with labels and masks.
    seed: run seed.
  """
  if size not in ("small", "tiny"):
    raise config_lib.ConfigError(f"size={size!r}; quickstart takes small or tiny")
  stage_size = "tiny" if size == "tiny" else "paper"
  classify = finetune_config(task="classification", data=data, size=stage_size,
                             encoder="resnet_tiny", seed=seed)
  segment = finetune_config(task="segmentation", data=data, size=stage_size,
                            encoder="resnet_tiny", init_from="stage:classify", seed=seed)
  if size == "small":
    for c in (classify, segment):
      c.data.image_size = 64
      c.model.small_input = False
      c.model.decoder_widths = (64, 32, 32, 16, 16)
      c.optim.lr = 2e-3
      c.optim.warmup_fraction = 0.05
      c.train.batch_size = 32
      c.train.num_epochs = 0.0
      c.train.num_steps = 300
      c.train.log_every = 25
      c.train.eval_every = 100
      c.train.checkpoint_every = 100
      c.train.eval_batch_size = 64
      c.train.max_eval_examples = 256
  return mlc.ConfigDict({"stages": ("classify", "segment"), "classify": classify,
                         "segment": segment})
