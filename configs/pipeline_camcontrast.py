"""CAMContrast end to end: stage 1, heatmaps + crops, stage 2, linear evaluation, segmentation.

  python -m medrep_jax.main \
      --config configs/pipeline_camcontrast.py:data=retinamnist,size=small \
      --workdir runs/pipeline_camcontrast

Stages: classifier -> heatmaps -> pretrain -> linear_eval (or linear_<pct>pct finetune
stages) -> finetune_seg, each in WORKDIR/<stage>/; WORKDIR/report.md puts their final
metrics side by side. The tiny CPU variant (size=tiny, data=phantoms, seg_data=phantoms)
runs every stage for 2 steps.
Variant args: the args of configs/camcontrast.py except stage, plus
  linear=probe|finetune|none
  seg_data=<image+mask dataset; "" = none; auto = kvasir_seg, or phantoms at size=tiny>
  seg_image_size=<px, 0 = 224 / 64 / 16 by size>.
"""
from medrep_jax import config_lib
from medrep_jax.presets.camcontrast import pipeline_config

DEFAULTS = dict(variant="camcontrast", size="paper", data="kermany", seed=0, image_size=0,
                crops_from="", attention=True, negative_suppression=True,
                background_suppression=True, discard_negatives=False, weighted=True,
                crop="five", linear="probe", seg_data="auto", seg_image_size=0)


def get_config(arg: str = ""):
  a = config_lib.parse_variant(arg, DEFAULTS)
  config = pipeline_config(**a)
  config.lock()
  return config
