"""CAMContrast end to end: stage 1, heatmaps + crops, stage 2, linear evaluation, segmentation.

  python -m medrep_jax.main \
      --config configs/pipeline_camcontrast.py:data=retinamnist,size=small \
      --workdir runs/pipeline_camcontrast

Stages: classifier -> heatmaps -> pretrain -> linear_eval (or linear_<pct>pct finetune
stages) -> finetune_seg, each in WORKDIR/<stage>/; WORKDIR/report.md puts their final
metrics side by side. The tiny CPU variant (size=tiny, data=phantoms, seg_data=phantoms)
runs every stage for 2 steps.
Variant args: the args of configs/camcontrast.py except stage, plus
  linear=probe|finetune|none  (probe: one `linear_eval` stage, frozen features + logistic
        regression at every label fraction (Table 8); finetune: one frozen-encoder
        `finetune` stage per label fraction, BCE, the paper's protocol)
  seg_data=<image+mask dataset for U-Net fine-tuning from f_I (Table 9); "" = none;
        auto = kvasir_seg, or at size=tiny phantoms when data is phantoms, else none>
  seg_image_size=<px, 0 = 224 / 64 / 16 by size>.
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

camcontrast = config_lib.config_module("camcontrast")
DEFAULTS = {**{k: v for k, v in camcontrast.DEFAULTS.items() if k != "stage"},
            **dict(linear="probe", seg_data="auto", seg_image_size=0)}
CHOICES = {**{k: v for k, v in camcontrast.CHOICES.items() if k != "stage"},
           **dict(linear=("probe", "finetune", "none"),
                  seg_data=("", "auto", *registry.PRESETS))}


def _downstream_encoder(ft: mlc.ConfigDict, pre: mlc.ConfigDict) -> None:
  """Makes a finetune config's encoder the pretrained f_I (same widths, channels, dtype)."""
  ft.model.encoder = pre.model.encoder
  ft.model.norm = pre.model.norm
  ft.model.unet_widths = tuple(pre.model.unet_widths)
  ft.model.decoder_widths = tuple(reversed(tuple(pre.model.unet_widths)[:-1]))
  # e.g. RGB kvasir read as grey for a grey encoder (the preset's value when pre leaves it 0)
  ft.data.channels = registry.fields_of(pre.data)["channels"]
  ft.init_from = "stage:pretrain"
  ft.init_from_rules = "encoder:encoder"
  ft.train.eval_split = "test"


def pipeline_stages(*, linear: str = "probe", seg_data: str = "auto",
                    seg_image_size: int = 0, **kw) -> dict[str, mlc.ConfigDict]:
  """`camcontrast.method_stages(**kw)`, then the linear and segmentation stages (see above)."""
  finetune = config_lib.config_module("finetune").finetune_config
  size, seed, data = (kw.get(k, DEFAULTS[k]) for k in ("size", "seed", "data"))
  if seg_data == "auto":
    tiny_seg = "phantoms" if data == "phantoms" else ""
    seg_data = tiny_seg if size == "tiny" else "kvasir_seg"
  stages = camcontrast.method_stages(**kw)
  pre = stages["pretrain"]
  if linear == "probe":
    lin = camcontrast.stage_config(
        "linear_eval", **{k: v for k, v in kw.items() if k != "crops_from"})
    lin.encoder_from = "stage:pretrain"
    stages["linear_eval"] = lin
  elif linear == "finetune":
    for fraction in pre.eval.label_fractions:
      ft = finetune(task="classification", data=pre.data.name,
                    size="tiny" if size == "tiny" else "paper", freeze=True,
                    label_fraction=float(fraction), seed=seed)
      _downstream_encoder(ft, pre)
      ft.data.image_size = pre.data.image_size
      stages[f"linear_{100 * fraction:g}pct"] = ft
  if seg_data:
    ft = finetune(task="segmentation", data=seg_data, size=size, seed=seed)
    _downstream_encoder(ft, pre)
    ft.data.image_size = seg_image_size or {"paper": 224, "small": 64, "tiny": 16}[size]
    if size == "small":
      ft.optim.lr = 1e-3
      ft.train.update(dict(batch_size=16, eval_every=0, checkpoint_every=300,
                           eval_batch_size=32, max_eval_examples=0, num_threads=2))
    stages["finetune_seg"] = ft
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  stages = pipeline_stages(**config_lib.parse_variant(arg, DEFAULTS, CHOICES))
  return config_lib.pipeline(stages).lock()
