"""CAMContrast on volumes (Yap & Ng, Sec. 4.7): stage-1 3-D classifier -> 3-D heatmaps + crops.

  python -m medrep_jax.main --config configs/camcontrast3d.py:size=small \
      --workdir runs/camcontrast3d

The 2-D pipeline of `configs/camcontrast.py` (its `stage_config`, so every field and
switch is the same) on whole volumes: a 3-D ResNet encoder (`resnet_tiny_3d`, small-input
stem), the attention loss on 3-D CAMs (eq. 4 summed over d, h, w), min-max normalized and
suppressed 3-D heatmaps, and the volume cut into 8 octants + 2 centre sub-volumes
(crop strategy "ten", Sec. 4.7: "each volume is divided into 8 non-overlapping
sub-volumes and 2 center sub-volumes"). The heatmap figure shows axial, coronal and
sagittal slices through each heatmap's peak.

Stages: classifier -> heatmaps. Stage 2 (contrastive pretraining on the 3-D crops) and
linear evaluation are NOT part of this config yet: the heatmap encoder f_h
(`models.cam.HeatmapEncoder`) takes 3-D heatmap crops, but the pretrain stage always runs
an on-device augmentation policy (`augment.augment_batch`; no "none" policy there) and
every policy is 2-D only ("expected a batch of images (B, H, W, C)" on the (B, 8, 8, 8, 1)
crops of size=tiny), so stage 2 waits for 3-D augmentation (`data/augment`) or a
no-augmentation path in `pretrain_stage.py`. The classifier here also trains without
augmentation (augment.policy="none") for the same reason.

Paper values (Sec. 4.7, ADNI): volumes 80 x 96 x 80 with 40 x 48 x 40 crops (size=paper
takes the preset's `volume_size`, (80, 96, 80) for volume_folder). Not stated, our
choices: the encoder and its width, the schedules of size=small/tiny.

Variant args:
  size=paper|small|tiny  (small: 32^3 volumes, a few hundred steps on 2 CPU cores;
        tiny: 16^3 volumes, 2 steps, the test scale)
  data=phantoms3d|volume_folder|covid_ct_volume  (phantoms: an alias of phantoms3d, the
        3-D phantoms, so the `size=tiny,data=phantoms` every config takes works here too)
  crop=ten|nine|eight  seed=<int>
  stage=all|classifier|heatmaps  (a single stage needs --config.classifier_from)
  Ablations (Table 4) as in camcontrast.py: attention=False, negative_suppression=False,
  background_suppression=False, discard_negatives=True, weighted=False.
"""
import ml_collections as mlc

from medrep_jax import config_lib

camcontrast = config_lib.config_module("camcontrast")

DEFAULTS = dict(stage="all", size="small", data="phantoms3d", seed=0, attention=True,
                negative_suppression=True, background_suppression=True,
                discard_negatives=False, weighted=True, crop="ten")
DATA_ALIASES = {"phantoms": "phantoms3d"}
CHOICES = dict(size=camcontrast.SIZES,
               data=("phantoms3d", "volume_folder", "covid_ct_volume", *DATA_ALIASES),
               stage=("all", "classifier", "heatmaps"), crop=("ten", "nine", "eight"))
# (D, H, W) of each size; paper: the preset's own (80 x 96 x 80 for volume_folder).
VOLUME_SIZES = {"small": (32, 32, 32), "tiny": (16, 16, 16)}


def stage_config(stage: str, *, size: str = "small", data: str = "phantoms3d",
                 **kw) -> mlc.ConfigDict:
  """camcontrast.stage_config on volumes: 3-D encoder, volume size, "ten" crops."""
  data = DATA_ALIASES.get(data, data)
  c = camcontrast.stage_config(stage, variant="camcontrast", data=data, size=size, **kw)
  if size in VOLUME_SIZES:
    c.data.volume_size = VOLUME_SIZES[size]
  c.data.image_size = int(c.data.volume_size[-1])  # in-plane size, for the records
  c.model.update(dict(encoder="resnet_tiny_3d", small_input=True))
  c.augment.policy = "none"  # the on-device policies are 2-D only (no 3-D augmentation yet)
  if size == "tiny" and data == "phantoms3d":
    c.data.num_examples = 32  # per split: the heatmaps stage reads the whole train split
  if size == "small" and stage == "classifier":
    c.train.update(dict(batch_size=16, eval_batch_size=32, max_eval_examples=128))
  elif size == "small":
    c.train.update(dict(eval_batch_size=32))
  return c


def get_config(arg: str = "") -> mlc.ConfigDict:
  a = config_lib.parse_variant(arg, DEFAULTS, CHOICES)
  stage = a.pop("stage")
  if stage != "all":
    return stage_config(stage, **a).lock()
  stages = {"classifier": stage_config("classifier", **a),
            "heatmaps": stage_config("heatmaps", **a)}
  stages["heatmaps"].classifier_from = "stage:classifier"
  return config_lib.pipeline(stages).lock()
