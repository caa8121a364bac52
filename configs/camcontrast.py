"""CAMContrast (Yap & Ng): stage 1 classifier -> heatmaps + crops -> stage 2 pretraining.

  python -m medrep_jax.main --config configs/camcontrast.py:data=retinamnist,size=small \
      --workdir runs/camcontrast

Variant args:
  variant=camcontrast|simclr|simclr_crop|supce|supce_crop|supcon|supcon_crop|random
        (Sec. 4.4 baselines; "-crop" reads the fixed-crop dataset, so stage 1 and the
        heatmaps run first; random = an untrained encoder, 0 steps)
  stage=all|classifier|heatmaps|pretrain|linear_eval  (all: the stages the variant needs;
        a single stage needs --config.classifier_from / crops_from / encoder_from)
  size=paper|small|tiny  data=<dataset with labels; class normal_class (0) is "normal">
  image_size=<px, 0 = the size's default>  seed=<int>  crops_from=<a heatmaps run to reuse>
  Ablations (Tables 3-4): attention=False, negative_suppression=False,
  background_suppression=False, discard_negatives=True, weighted=False,
  crop=five|four|none|random.
"""
from medrep_jax import config_lib
from medrep_jax.presets.camcontrast import method_pipeline, stage_config

DEFAULTS = dict(variant="camcontrast", stage="all", size="paper", data="kermany", seed=0,
                image_size=0, crops_from="", attention=True, negative_suppression=True,
                background_suppression=True, discard_negatives=False, weighted=True,
                crop="five")


def get_config(arg: str = ""):
  a = config_lib.parse_variant(arg, DEFAULTS)
  stage = a.pop("stage")
  if stage == "all":
    config = method_pipeline(**a)
  else:
    crops_from = a.pop("crops_from")
    config = stage_config(stage, **a)
    config.crops_from = crops_from
  config.lock()
  return config
