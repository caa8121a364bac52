"""Multi-method pipelines: synthesis → pretraining → fine-tuning on one dataset."""
from __future__ import annotations

import ml_collections as mlc

from medrep_jax.presets.dcl_cstp import dcl_cstp_config
from medrep_jax.presets.finetune import finetune_config
from medrep_jax.presets.ldm import ldm_pipeline_config


def dcl_cstp_pipeline_config(*, data: str = "busi", size: str = "paper",
                             variant: str = "dcl_cstp", synthetic_ratio: float = 0.5,
                             seed: int = 0) -> mlc.ConfigDict:
  """ldm (vae → unet → sample → filter) → pretrain → finetune_cls and finetune_seg.

  The dataset needs class labels and masks (BUSI, phantoms). Pretraining mixes in
  `synthetic_ratio × |train|` filtered synthetic images (dual-stream paper, Table 4); both
  fine-tunings start from the pretrained encoder.
  """
  ldm_size = {"paper": "paper", "small": "small", "tiny": "tiny"}[size]
  ldm = ldm_pipeline_config(data=data, size=ldm_size, seed=seed)
  pre = dcl_cstp_config(variant=variant, data=data, size=size,
                        synthetic_ratio=synthetic_ratio, seed=seed)
  pre.synthetic_dir = "stage:filter/images"
  pre.data.image_size = ldm.vae.data.image_size  # synthetic and real images share a size
  stages = {s: ldm[s] for s in ldm.stages}
  stages["pretrain"] = pre
  for name, task in (("finetune_cls", "classification"), ("finetune_seg", "segmentation")):
    ft = finetune_config(task=task, data=data, size="tiny" if size == "tiny" else "paper",
                         encoder=pre.model.encoder, init_from="stage:pretrain", seed=seed)
    ft.model.small_input = pre.model.small_input
    ft.data.image_size = pre.data.image_size
    if size == "small":
      ft.train.update(dict(num_epochs=0.0, num_steps=600, eval_every=200,
                           checkpoint_every=200, batch_size=32, max_eval_examples=256))
    stages[name] = ft
  return mlc.ConfigDict({"stages": tuple(stages), **stages})
