"""The dual-stream paper end to end: LDM synthesis, DCL-CsTP pretraining, both fine-tunings.

  python -m medrep_jax.main --config configs/pipeline_dcl_cstp.py:data=busi,size=small \
      --workdir runs/pipeline_dcl_cstp

Stages: vae → unet → sample → filter → pretrain → finetune_cls → finetune_seg, each in
WORKDIR/<stage>/; WORKDIR/report.md puts their final metrics side by side. The dataset
needs class labels and masks (BUSI, phantoms). Pretraining mixes in `synthetic_fraction`
of the filtered synthetic pool (Table 4: 0, 0.1, 0.5, 1; `synthetic_only=True` drops the
real images); both fine-tunings start from the pretrained encoder.
Variant args: data=<dataset with labels and masks> (busi, phantoms), size=paper|small|tiny,
variant=<a configs/dcl_cstp.py variant>, synthetic_fraction=<0..1>, synthetic_only=True|False,
seed=<int>.
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

dcl_cstp = config_lib.config_module("dcl_cstp")
DEFAULTS = dict(data="busi", size="paper", variant="dcl_cstp", synthetic_fraction=1.0,
                synthetic_only=False, seed=0)
CHOICES = dict(data=registry.PRESETS, size=("paper", "small", "tiny"),
               variant=dcl_cstp.VARIANTS)


def pipeline_stages(*, data: str = "busi", size: str = "paper", variant: str = "dcl_cstp",
                    synthetic_fraction: float = 1.0, synthetic_only: bool = False,
                    seed: int = 0) -> dict[str, mlc.ConfigDict]:
  """ldm (vae → unet → sample → filter) → pretrain → finetune_cls and finetune_seg."""
  stages = config_lib.config_module("ldm").pipeline_stages(data=data, size=size, seed=seed)
  pre = dcl_cstp.dcl_cstp_config(variant=variant, data=data, size=size,
                                 synthetic_fraction=synthetic_fraction,
                                 synthetic_only=synthetic_only, seed=seed)
  pre.synthetic_dir = "stage:filter/images"
  pre.data.image_size = stages["vae"].data.image_size  # synthetic and real images match
  stages["pretrain"] = pre
  finetune = config_lib.config_module("finetune").finetune_config
  for name, task in (("finetune_cls", "classification"), ("finetune_seg", "segmentation")):
    ft = finetune(task=task, data=data, size=size, encoder=pre.model.encoder,
                  init_from="stage:pretrain", seed=seed)
    ft.model.small_input = pre.model.small_input
    ft.data.image_size = pre.data.image_size
    if size == "small":  # this pipeline's own schedule, with the paper-size decoder
      ft.model.decoder_widths = (256, 128, 64, 32, 16)
      ft.train.update(dict(num_steps=600, log_every=50, eval_every=200, checkpoint_every=200))
    stages[name] = ft
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  stages = pipeline_stages(**config_lib.parse_variant(arg, DEFAULTS, CHOICES))
  return config_lib.pipeline(stages).lock()
