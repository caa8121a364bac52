"""CAMContrast (Yap & Ng): stage 1 classifier -> heatmaps + crops -> stage 2 pretraining.

  python -m medrep_jax.main --config configs/camcontrast.py:data=retinamnist,size=small \
      --workdir runs/camcontrast

Paper values (Sec. 3-4): λ = 0.01 (eq. 2); τ = 0.05 (eq. 5, Fig. 5); foreground threshold
15 (Fig. 3); images resized to 448 and 224 x 224 fixed crops (Sec. 4.1); U-Net encoder for
f_I, f_h = three 3x3 conv + ReLU, 2-layer MLP projectors to 128-d (Sec. 4.2); stage 2 with
SGD, momentum 0.95, lr 1e-3, weight decay 1e-4, linear warmup over 30% of the steps then
cosine, batch 120, 25k steps (OIA-ODIR) (Sec. 4.2). Linear evaluation at 1%, 5%, 25% and
100% of the labels (Table 8).
Not stated, our choices: the stage-1 optimizer and schedule (AdamW 1e-3, cosine,
30 epochs), the U-Net widths (the classic 64..1024), f_h widths (32, 64, 128) and the
projector hidden width (the encoder width).

Variant args:
  variant=camcontrast|simclr|simclr_crop|supce|supce_crop|supcon|supcon_crop|random
        (Sec. 4.4 baselines; "-crop" reads the fixed-crop dataset, so stage 1 and the
        heatmaps run first; random = an untrained encoder, 0 steps)
  stage=all|classifier|heatmaps|pretrain|linear_eval  (all: the stages the variant needs;
        a single stage needs --config.classifier_from / crops_from / encoder_from)
  size=paper|small|tiny  (small: a 2-core CPU run on 28-64 px images, 32 px by default,
        with a 3-level U-Net encoder (stride 4: 8x8 heatmaps at 32 px, 4x4 per crop) and
        short schedules; tiny: the 2-step test scale)
  data=<dataset with labels; class normal_class (0) is "normal">
  image_size=<px, 0 = the size's default>  seed=<int>  crops_from=<a heatmaps run to reuse>
  Ablations (Tables 3-4): attention=False, negative_suppression=False,
  background_suppression=False, discard_negatives=True, weighted=False,
  crop=five|four|none|random.
Two random crops per image for the two-view baselines: --config.pretrain.crops.views=
independent (default; Sec. 3.2) or shared (one crop, augmented twice).
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry
from medrep_jax.losses import cam as cam_losses
from medrep_jax.losses import contrastive

# variant -> (loss.objective, data_source); "random" is an untrained encoder (0 steps).
_OBJECTIVES = {"camcontrast": ("image_heatmap", "crops"), "simclr": ("nt_xent", "images"),
               "simclr_crop": ("nt_xent", "crops"), "supce": ("ce", "images"),
               "supce_crop": ("ce", "crops"), "supcon": ("supcon", "images"),
               "supcon_crop": ("supcon", "crops"), "random": ("nt_xent", "images")}
VARIANTS = tuple(_OBJECTIVES)
SIZES = ("paper", "small", "tiny")
DEFAULTS = dict(variant="camcontrast", stage="all", size="paper", data="kermany", seed=0,
                image_size=0, crops_from="", attention=True, negative_suppression=True,
                background_suppression=True, discard_negatives=False, weighted=True,
                crop="five")
CHOICES = dict(variant=VARIANTS, size=SIZES, data=registry.PRESETS,
               stage=("all", "classifier", "heatmaps", "pretrain", "linear_eval"),
               crop=("five", "four", "none", "random"))


def needs_crops(variant: str) -> bool:
  """Whether the variant's stage 2 reads the crop dataset (so stage 1 + heatmaps run first)."""
  return _OBJECTIVES[variant][1] == "crops"


def stage_config(stage: str, *, variant: str = "camcontrast", data: str = "kermany",
                 size: str = "paper", seed: int = 0, image_size: int = 0,
                 attention: bool = True, negative_suppression: bool = True,
                 background_suppression: bool = True, discard_negatives: bool = False,
                 weighted: bool = True, crop: str = "five") -> mlc.ConfigDict:
  """One stage's full config; every stage carries every field, so overrides work anywhere.

  The switches give the ablations: attention=False (Table 4 "no attention loss"),
  negative_suppression / background_suppression=False, discard_negatives=True,
  weighted=False ("unweighted heatmaps"), crop=five|four|none|random (Table 3).
  """
  c = config_lib.base_config("camcontrast")
  c.stage = stage
  c.variant = variant
  c.seed = seed
  c.data = registry.data_config(data)
  c.data.image_size = image_size or {"paper": 448, "small": 32, "tiny": 16}[size]
  c.coarse = mlc.ConfigDict(dict(normal_class=0))  # every other class is "abnormal"
  c.classifier_from = ""  # heatmaps: the stage-1 run ("stage:classifier")
  c.crops_from = ""  # pretrain: the heatmaps run ("stage:heatmaps")
  c.encoder_from = ""  # linear_eval: the pretrain run ("stage:pretrain")
  objective, c.data_source = _OBJECTIVES[variant]
  c.model = mlc.ConfigDict(dict(encoder="unet_encoder", norm="batch", small_input=False,
                                unet_widths=(64, 128, 256, 512, 1024), mlp_hidden=1024,
                                embed_dim=128, heatmap_widths=(32, 64, 128)))
  c.loss = mlc.ConfigDict(dict(
      attention_weight=cam_losses.ATTENTION_WEIGHT if attention else 0.0,
      objective=objective, temperature=contrastive.CAMCONTRAST_TEMPERATURE))
  c.augment = mlc.ConfigDict(dict(policy="standard"))
  c.heatmap = mlc.ConfigDict(dict(
      weighted=bool(weighted), negative_suppression=bool(negative_suppression),
      background_suppression=bool(background_suppression), foreground_threshold=15.0,
      discard_negatives=bool(discard_negatives), splits=("train",), figure_split="val",
      figure_pool=256))
  # views: SimCLR / SupCon on random crops take one independent random crop per view, the
  # conventional "two random crops within each image" (Sec. 3.2, 4.4); "shared" augments one
  # crop per image twice. CAMContrast's image and heatmap crops always share one box.
  c.crops = mlc.ConfigDict(dict(strategy=crop, views="independent"))
  c.monitor = mlc.ConfigDict(dict(knn_k=20, max_train=2000))
  # Table 8's label fractions: 1, 5, 25, 50 and 100%.
  c.eval = mlc.ConfigDict(dict(label_fractions=(0.01, 0.05, 0.25, 0.5, 1.0), split="test",
                               probe_epochs=100, weight_decay=1e-4))
  # protocol: "lbfgs" (full-batch logistic regression, above) or "sgd" (the paper protocol:
  # SGD, momentum 0.9, wd 0, 60 epochs, batch 40, the LR picked from `lrs` on `val_split`,
  # never on `split`; the grid spans standardized features, `probes.SGD_LRS`).
  c.eval.update(dict(protocol="lbfgs", val_split="val", sgd=mlc.ConfigDict(dict(
      lrs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), epochs=60, batch_size=40, momentum=0.9,
      weight_decay=0.0))))
  # t-SNE of the frozen `split` features (figures/embedding_tsne.png; DCL-CsTP Fig. 6,
  # CAMContrast Fig. 8), on at most embedding_max_points images (a seeded random draw).
  c.eval.update(dict(embedding=True, embedding_max_points=2000, embedding_perplexity=30.0,
                     embedding_iterations=1000))
  if stage == "classifier":
    c.optim.update(dict(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine"))
    c.train.update(dict(batch_size=120, num_epochs=30.0, eval_every=0))
  else:
    c.optim.update(dict(name="sgd", lr=1e-3, momentum=0.95, weight_decay=1e-4,
                        schedule="cosine", warmup_fraction=0.3))
    c.train.update(dict(batch_size=120, num_steps=25_000, eval_every=5_000))
  if size == "small":  # 2-core CPU scale: 3-level U-Net, short schedules, larger stage-2 lr
    c.model.update(dict(unet_widths=(32, 64, 128), mlp_hidden=128, heatmap_widths=(16, 32, 64)))
    c.train.update(dict(batch_size=64, eval_batch_size=128, max_eval_examples=512, log_every=25,
                        num_threads=2))
    c.monitor.max_train = 1024
    c.heatmap.figure_pool = 128
    if stage == "classifier":
      c.train.update(dict(num_epochs=0.0, num_steps=400, eval_every=200, checkpoint_every=200))
    else:
      # lr 1e-3 with SGD barely moves in a few hundred steps; the short run uses 0.05.
      c.optim.lr = 0.05
      c.train.update(dict(num_steps=300, eval_every=0, checkpoint_every=300))
  elif size == "tiny":
    c.model.update(dict(unet_widths=(8, 16), mlp_hidden=16, embed_dim=8,
                        heatmap_widths=(4, 4, 4)))
    config_lib.set_tiny_train(c)
    c.monitor.max_train = 16
    c.heatmap.figure_pool = 16
    c.eval.update(dict(label_fractions=(0.25, 1.0), probe_epochs=5, embedding_iterations=50))
    c.eval.sgd.update(dict(lrs=(0.1, 1.0), epochs=2))
  if variant == "random" or stage in ("heatmaps", "linear_eval"):  # no training steps
    c.train.update(dict(num_epochs=0.0, num_steps=0))
  return c


def method_stages(*, crops_from: str = "", **kw) -> dict[str, mlc.ConfigDict]:
  """classifier -> heatmaps -> pretrain (crop variants), or pretrain alone (image variants).

  Args:
    crops_from: a finished heatmaps run to reuse instead of stage 1 + heatmaps.
    **kw: `stage_config` arguments (variant, data, size, seed, ...).
  """
  crops = needs_crops(kw.get("variant", "camcontrast"))
  stages = {}
  if crops and not crops_from:
    stages["classifier"] = stage_config("classifier", **kw)
    stages["heatmaps"] = stage_config("heatmaps", **kw)
    stages["heatmaps"].classifier_from = "stage:classifier"
    crops_from = "stage:heatmaps"
  stages["pretrain"] = stage_config("pretrain", **kw)
  stages["pretrain"].crops_from = crops_from if crops else ""
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  a = config_lib.parse_variant(arg, DEFAULTS, CHOICES)
  stage = a.pop("stage")
  if stage == "all":
    return config_lib.pipeline(method_stages(**a)).lock()
  config = stage_config(stage, **{k: v for k, v in a.items() if k != "crops_from"})
  config.crops_from = a["crops_from"]
  return config.lock()
