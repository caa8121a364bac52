"""The dual-stream paper end to end: LDM synthesis, DCL-CsTP pretraining, both fine-tunings.

  python -m medrep_jax.main --config configs/pipeline_dcl_cstp.py:data=busi,size=small \
      --workdir runs/pipeline_dcl_cstp

Stages: vae → unet → sample → filter → pretrain → finetune_cls → finetune_seg, each in
WORKDIR/<stage>/; WORKDIR/report.md puts their final metrics side by side.
Variant args: data=<dataset with labels and masks> (busi, phantoms), size=paper|small|tiny,
variant=<a configs/dcl_cstp.py variant>, synthetic_ratio=<0..1>, seed=<int>.
"""
from medrep_jax import config_lib
from medrep_jax.presets.pipelines import dcl_cstp_pipeline_config

DEFAULTS = dict(data="busi", size="paper", variant="dcl_cstp", synthetic_ratio=0.5, seed=0)


def get_config(arg: str = ""):
  config = dcl_cstp_pipeline_config(**config_lib.parse_variant(arg, DEFAULTS))
  config.lock()
  return config
