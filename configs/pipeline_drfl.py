"""DRFL end to end: SR teacher -> the network(s) -> the Tables 5-7 table.

  python -m medrep_jax.main --config configs/pipeline_drfl.py:size=small,ladder=True \
      --workdir runs/pipeline_drfl

Stages: `teacher` (Sec. 3.1.2: trains the SR teacher on 1/2-size images and caches its 2x
outputs of the training images), then one `train` stage per variant that reads those
targets (`teacher_from="stage:teacher"`), then `table`: Dice, IoU, pixel accuracy and
GFLOPs per image per variant, beside the paper's LUNG numbers (Tables 1, 5-7). With
`sr_target=bicubic` the teacher stage is left out.
Variant args: variant=<a configs/drfl.py variant> (the one trained without `ladder`),
ladder=True|False (train every variant: unet, ss, ss_srs, dfm, dfm_rftm, dfm_rftm_cbam,
drfl), size=paper|small|tiny, data=<dataset with masks>, sr_target=teacher|bicubic,
recipe=paper|code, fold=<0..3 or -1>, seed=<int>.
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

drfl = config_lib.config_module("drfl")
DEFAULTS = dict(variant="drfl", ladder=False, size="paper", data="kaggle_lungs_ct_64",
                sr_target="teacher", recipe="paper", fold=-1, seed=0)
CHOICES = dict(variant=drfl.VARIANTS, size=("paper", "small", "tiny"), data=registry.PRESETS,
               sr_target=("teacher", "bicubic"), recipe=("paper", "code"),
               fold=(-1, 0, 1, 2, 3))


def pipeline_stages(*, variant: str = "drfl", ladder: bool = False, size: str = "paper",
                    data: str = "kaggle_lungs_ct_64", sr_target: str = "teacher",
                    recipe: str = "paper", fold: int = -1,
                    seed: int = 0) -> dict[str, mlc.ConfigDict]:
  """teacher (when sr_target=teacher) -> one train stage per variant -> table."""
  common = dict(size=size, data=data, fold=fold, seed=seed)
  stages = {}
  if sr_target == "teacher":
    stages["teacher"] = drfl.teacher_config(**common)
  variants = drfl.VARIANTS if ladder else (variant,)
  for v in variants:
    stages[v] = drfl.drfl_config(variant=v, sr_target=sr_target, recipe=recipe,
                                 teacher_from="stage:teacher" if sr_target == "teacher"
                                 else "", **common)
  table = config_lib.base_config("drfl")
  table.stage = "table"
  table.eval_split = stages[variants[0]].train.eval_split
  table.rows = mlc.ConfigDict({v: f"stage:{v}" for v in variants})
  if size == "tiny":
    config_lib.set_tiny_train(table)  # the table trains nothing; keep the tiny contract
  stages["table"] = table
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  stages = pipeline_stages(**config_lib.parse_variant(arg, DEFAULTS, CHOICES))
  return config_lib.pipeline(stages).lock()
