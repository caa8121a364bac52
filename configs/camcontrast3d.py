"""CAMContrast on volumes (Yap & Ng, Sec. 4.7, Table 11): the whole method in 3-D.

  python -m medrep_jax.main --config configs/camcontrast3d.py:size=small \
      --workdir runs/camcontrast3d

The 2-D method of `configs/camcontrast.py` (its `stage_config`, so every field and switch
is the same) on whole volumes: a 3-D ResNet encoder, the attention loss on 3-D CAMs
(eq. 4 summed over d, h, w), min-max normalized and suppressed 3-D heatmaps, the volume cut
into 8 octants + 2 centre sub-volumes (crop strategy "ten", Sec. 4.7: "each volume is
divided into 8 non-overlapping sub-volumes and 2 center sub-volumes"), stage 2 on those
sub-volumes and their heatmap crops, then the transfer task of Table 11: the encoder
fine-tuned on the volume labels (AUC-ROC per class and their mean). The heatmap figure shows
axial, coronal and sagittal slices through each heatmap's peak.

"Other than architectural changes, the pretraining and fine-tuning pipeline ... remains
unchanged" (Sec. 4.7), so the standard augmentation of the 2-D runs is carried to volumes:
`augment.policy="standard3d"` (a 3-D resized crop of scale (0.8, 1), a left-right flip,
the same in-plane rotation of every slice, brightness/contrast jitter;
`data/augment/volume.py`) in stage 1 and stage 2, and Table 2's classification
augmentation (crop scale (0.8, 1), flip 0.5, rotation +-30) in the fine-tuning stage.

Stages (stage=all): classifier -> heatmaps -> pretrain -> linear_eval -> finetune;
variant=random skips the first four (Table 11's "Random": the fine-tuning stage from a
random initialization).

Paper values (Sec. 4.7, ADNI-1): volumes 80 x 96 x 80 with 40 x 48 x 40 crops (size=paper
takes the preset's `volume_size`, (80, 96, 80) for volume_folder); pretraining with SGD,
lr 1e-3, weight decay 1e-5, batch 16, 120 epochs; fine-tuning on the 3-way task (AD, MCI,
CN) for 100 epochs, weight decay 1e-5, batch 8, the lr picked on the validation split from
5 log-spaced values in [1e-3, 1e-1] (FINETUNE_LRS: `python -m launch.sweep --sweep
'finetune.optim.lr=[...]' --select-by eval/auc_mean`). Not stated, our choices: the 3-D
encoder (the paper's is Yang et al.'s 3-D ResNet variant; `resnet18_3d` at size=paper,
`resnet_tiny_3d` below), SGD momentum 0.9 and a cosine schedule for fine-tuning (Table
A.1's), softmax cross-entropy for the 3-way task, the schedules of size=small/tiny.

Variant args:
  variant=camcontrast|supce_crop|supcon_crop|simclr_crop|random  (Table 11's rows; the
        "-crop" baselines train on the same fixed sub-volumes)
  size=paper|small|tiny  (small: 32^3 volumes, 200 + 200 + 150 steps, under an hour on
        2 CPU cores;
        tiny: 16^3 volumes, 2 steps, the test scale)
  data=phantoms3d|volume_folder|covid_ct_volume  (phantoms: an alias of phantoms3d, the
        3-D phantoms, so the `size=tiny,data=phantoms` every config takes works here too)
  crop=ten|nine|eight  seed=<int>  linear=probe|none  (a linear probe on the frozen
        encoder before fine-tuning, Table 8's protocol on volumes)
  stage=all|classifier|heatmaps|pretrain|linear_eval|finetune  (a single stage needs
        --config.classifier_from / crops_from / encoder_from / init_from)
  Ablations (Table 4) as in camcontrast.py: attention=False, negative_suppression=False,
  background_suppression=False, discard_negatives=True, weighted=False.
"""
import ml_collections as mlc

from medrep_jax import config_lib

camcontrast = config_lib.config_module("camcontrast")
finetune = config_lib.config_module("finetune")

VARIANTS = ("camcontrast", "supce_crop", "supcon_crop", "simclr_crop", "random")
DEFAULTS = dict(variant="camcontrast", stage="all", size="small", data="phantoms3d", seed=0,
                attention=True, negative_suppression=True, background_suppression=True,
                discard_negatives=False, weighted=True, crop="ten", linear="probe")
DATA_ALIASES = {"phantoms": "phantoms3d"}
CHOICES = dict(variant=VARIANTS, size=camcontrast.SIZES,
               data=("phantoms3d", "volume_folder", "covid_ct_volume", *DATA_ALIASES),
               stage=("all", "classifier", "heatmaps", "pretrain", "linear_eval", "finetune"),
               crop=("ten", "nine", "eight"), linear=("probe", "none"))
# (D, H, W) of each size; paper: the preset's own (80 x 96 x 80 for volume_folder).
VOLUME_SIZES = {"small": (32, 32, 32), "tiny": (16, 16, 16)}
# Sec. 4.7: "5 logarithmically spaced values in the interval [1e-3, 1e-1]".
FINETUNE_LRS = (1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1)
ENCODERS = {"paper": "resnet18_3d", "small": "resnet_tiny_3d", "tiny": "resnet_tiny_3d"}


def _on_volumes(c: mlc.ConfigDict, size: str, data: str) -> None:
  """A 2-D stage config moved to volumes of this size (in place)."""
  if size in VOLUME_SIZES:
    c.data.volume_size = VOLUME_SIZES[size]
  c.data.image_size = int(c.data.volume_size[-1])  # in-plane size, for the records
  if size == "tiny" and data == "phantoms3d":
    c.data.num_examples = 32  # per split: the heatmaps stage reads the whole train split


def stage_config(stage: str, *, variant: str = "camcontrast", size: str = "small",
                 data: str = "phantoms3d", seed: int = 0, **kw) -> mlc.ConfigDict:
  """camcontrast.stage_config on volumes (3-D encoder, volume size, "ten" crops, 3-D
  augmentation), or the Table 11 fine-tuning stage (stage="finetune")."""
  data = DATA_ALIASES.get(data, data)
  if stage == "finetune":
    return finetune_stage(size=size, data=data, seed=seed)
  pretrain_variant = "camcontrast" if variant == "random" else variant
  c = camcontrast.stage_config(stage, variant=pretrain_variant, data=data, size=size,
                               seed=seed, **kw)
  _on_volumes(c, size, data)
  c.model.update(dict(encoder=ENCODERS[size], small_input=size != "paper"))
  c.augment.policy = "standard3d"  # Sec. 4.7: the 2-D pipeline's standard augmentation
  if size == "paper" and stage == "pretrain":  # Sec. 4.7
    c.optim.update(dict(lr=1e-3, weight_decay=1e-5))
    c.train.update(dict(batch_size=16, num_steps=0, num_epochs=120.0))
  if size == "small" and stage == "classifier":  # 200 steps of 8: about 12 min on 2 CPU cores
    c.train.update(dict(batch_size=8, num_steps=200, eval_every=100, checkpoint_every=100,
                        eval_batch_size=32, max_eval_examples=128))
  elif size == "small" and stage == "pretrain":
    c.train.update(dict(batch_size=32, num_steps=200, checkpoint_every=200, eval_batch_size=32))
  elif size == "small":
    c.train.update(dict(eval_batch_size=32))
  return c


def finetune_stage(*, size: str = "small", data: str = "phantoms3d",
                   seed: int = 0) -> mlc.ConfigDict:
  """Table 11's transfer task: the whole encoder fine-tuned on the volume labels."""
  c = finetune.finetune_config(task="classification", data=data,
                               size="tiny" if size == "tiny" else "paper", seed=seed,
                               encoder=ENCODERS[size], protocol="camcontrast")
  _on_volumes(c, size, data)
  c.model.small_input = size != "paper"
  c.loss = "ce"  # one label of K (AD / MCI / CN); AUC-ROC one-vs-rest per class
  c.optim.update(dict(weight_decay=1e-5, lr=1e-2))  # the middle of FINETUNE_LRS
  c.train.update(dict(batch_size=8, num_epochs=100.0))  # Sec. 4.7
  c.train.eval_split = "test"
  if size == "small":
    c.train.update(dict(num_epochs=0.0, num_steps=150, batch_size=8, eval_every=0,
                        checkpoint_every=150, eval_batch_size=32, max_eval_examples=0,
                        log_every=25, num_threads=2))
  elif size == "tiny":
    config_lib.set_tiny_train(c)
  return c


def pipeline_stages(*, variant: str = "camcontrast", linear: str = "probe",
                    **kw) -> dict[str, mlc.ConfigDict]:
  """classifier -> heatmaps -> pretrain (-> linear_eval) -> finetune; finetune alone for
  variant=random."""
  stages = {}
  if variant != "random":
    for name in ("classifier", "heatmaps", "pretrain"):
      stages[name] = stage_config(name, variant=variant, **kw)
    stages["heatmaps"].classifier_from = "stage:classifier"
    stages["pretrain"].crops_from = "stage:heatmaps"
    if linear == "probe":
      stages["linear_eval"] = stage_config("linear_eval", variant=variant, **kw)
      stages["linear_eval"].encoder_from = "stage:pretrain"
  ft = stage_config("finetune", variant=variant, **kw)
  if variant != "random":
    ft.init_from = "stage:pretrain"
    ft.init_from_rules = "encoder:encoder"
  stages["finetune"] = ft
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  a = config_lib.parse_variant(arg, DEFAULTS, CHOICES)
  stage, linear = a.pop("stage"), a.pop("linear")
  if stage != "all":
    return stage_config(stage, **a).lock()
  return config_lib.pipeline(pipeline_stages(linear=linear, **a)).lock()
