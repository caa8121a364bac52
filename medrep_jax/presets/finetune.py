"""Fine-tuning configs (dual-stream contrastive paper, Section III-E, Stage 3).

Paper defaults: classification uses AdamW (wd 1e-3, lr 1e-4), batch 32, 30 epochs, cosine
schedule, BCE (eq. 8); segmentation uses AdamW (wd 1e-5, lr 1e-4), batch 8, 100 epochs,
IoU + BCE (eq. 9).
"""
from __future__ import annotations

import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry


def finetune_config(*, task: str = "classification", data: str = "phantoms",
                    size: str = "paper", encoder: str | None = None,
                    init_from: str = "", freeze: bool = False,
                    label_fraction: float = 1.0, seed: int = 0) -> mlc.ConfigDict:
  """A complete, unlocked fine-tuning config."""
  if task not in ("classification", "segmentation"):
    raise config_lib.ConfigError(f"task={task!r}; expected classification or segmentation")
  c = config_lib.base_config("finetune")
  c.seed = seed
  c.task = task
  c.init_from = init_from
  c.init_from_rules = "encoder:encoder" if init_from else ""
  c.freeze_encoder = bool(freeze)
  c.label_fraction = float(label_fraction)
  c.loss = "bce" if task == "classification" else "iou_bce"
  tiny = size == "tiny"
  c.data = registry.data_config(data)
  c.model = mlc.ConfigDict()
  c.model.encoder = encoder or ("resnet_tiny" if tiny else "resnet50")
  c.model.norm = "batch"
  c.model.small_input = tiny or c.data.image_size <= 64
  c.model.unet_widths = (32, 64, 128, 256)
  c.model.decoder_widths = (256, 128, 64, 32, 16)
  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"
  if task == "classification":
    c.optim.weight_decay = 1e-3
    c.train.batch_size = 32
    c.train.num_epochs = 30.0
  else:
    c.optim.weight_decay = 1e-5
    c.train.batch_size = 8
    c.train.num_epochs = 100.0
  if tiny:
    c.data.image_size = 32
    c.model.decoder_widths = (32, 16, 16, 8, 8)
    config_lib.set_tiny_train(c)
  return c
