"""Fine-tuning: classification (linear head, BCE eq. 8) or U-Net segmentation (eq. 9).

  python -m medrep_jax.main --config configs/finetune.py:task=segmentation,data=kvasir_seg \
      --workdir runs/ft_seg --config.init_from=runs/pretrain

Paper values (dual-stream contrastive paper, Section III-E, Stage 3): classification uses
AdamW (wd 1e-3, lr 1e-4), batch 32, 30 epochs, cosine schedule, BCE (eq. 8); segmentation
uses AdamW (wd 1e-5, lr 1e-4), batch 8, 100 epochs, IoU + BCE (eq. 9).

Variant args: task=classification|segmentation, size=paper|small|tiny (small: the CPU scale
the quickstart and the small pipelines start from, 300 steps of batch 32 at 64 px; tiny: 2
steps), data=<dataset>, encoder=<a ResNet name or unet_encoder; default resnet50, or
resnet_tiny below paper size>, init_from=<run dir>, freeze=True|False,
label_fraction=<0..1>, seed=<int>, protocol=dcl_cstp|camcontrast.

protocol=camcontrast is the CAMContrast downstream protocol (Yap & Ng, Appendix Table A.1,
the chest X-ray columns, and Table 2): SGD with momentum 0.9 and a cosine schedule for 60
epochs; segmentation (SIIM-ACR) with batch 5, weight decay 1e-5 and lr 1e-2, the middle of
the grid CAMCONTRAST_SEG_LRS; classification (ChestX-ray14) with batch 40, no weight decay
and lr 1e-2 (0.1 with freeze=True) from CAMCONTRAST_CLS_LRS. The paper picks the lr from
the grid on the validation split: run the grid with `python -m launch.sweep --sweep
'optim.lr=[...]' --select-by eval/<metric>` (launch/README.md). Training augmentation
(Table 2, chest X-ray): flip p 0.5, rotation +-30 degrees, and for classification a
resized crop of scale (0.8, 1) and aspect (0.75, 1.33). A validation split of 20% of train
where the data has none (Sec. 4.1). The fundus columns differ: --config.train.num_epochs=90
(REFUGE-seg, Vessel-seg) and --config.augment.rotate_degrees=90 (fundus segmentation) or 0
(fundus classification).

`augment` (every protocol; the identity by default, i.e. no augmentation): crop_scale,
crop_ratio (a random resized crop at the input size), flip_p, rotate_degrees, fill; the
mask moves with the image (medrep_jax/data/augment/policies.py: downstream_augment).
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry
from medrep_jax.models import unet

DEFAULTS = dict(task="classification", size="paper", data="phantoms", encoder=None,
                init_from="", freeze=False, label_fraction=1.0, seed=0, protocol="dcl_cstp")
CHOICES = dict(task=("classification", "segmentation"), size=("paper", "small", "tiny"),
               data=registry.PRESETS, encoder=(None, *unet.ENCODER_NAMES),
               protocol=("dcl_cstp", "camcontrast"))
# CAMContrast Table A.1 learning-rate grids: ^c (SGD segmentation: REFUGE-seg, Vessel-seg,
# SIIM-ACR) and ^a (classification).
CAMCONTRAST_SEG_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
CAMCONTRAST_CLS_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def camcontrast_protocol(c: mlc.ConfigDict, *, classification: bool, freeze: bool) -> None:
  """The CAMContrast downstream protocol (Table A.1 chest X-ray columns, Table 2), in place.

  See the module docstring; the lr is one point of the Table A.1 grid, to be chosen on the
  validation split by a sweep over CAMCONTRAST_SEG_LRS / CAMCONTRAST_CLS_LRS.
  """
  c.optim.update(dict(name="sgd", momentum=0.9, schedule="cosine", warmup_fraction=0.0,
                      weight_decay=0.0 if classification else 1e-5,
                      lr=0.1 if classification and freeze else 1e-2))
  c.train.update(dict(num_epochs=60.0, batch_size=40 if classification else 5))
  c.augment.update(dict(flip_p=0.5, rotate_degrees=30.0))  # Table 2, chest X-ray columns
  if classification:
    c.augment.update(dict(crop_scale=(0.8, 1.0), crop_ratio=(0.75, 1.33)))
  c.data.val_fraction = 0.2  # Sec. 4.1: 20% of train where the data has no val split


def finetune_config(*, task: str = "classification", data: str = "phantoms",
                    size: str = "paper", encoder: str | None = None,
                    init_from: str = "", freeze: bool = False,
                    label_fraction: float = 1.0, seed: int = 0,
                    protocol: str = "dcl_cstp") -> mlc.ConfigDict:
  """A complete, unlocked fine-tuning config."""
  classification = task == "classification"
  c = config_lib.base_config("finetune")
  c.seed = seed
  c.task = task
  c.init_from = init_from
  c.init_from_rules = "encoder:encoder" if init_from else ""
  c.freeze_encoder = bool(freeze)
  c.label_fraction = float(label_fraction)
  c.loss = "bce" if classification else "iou_bce"
  c.data = registry.data_config(data)
  c.model = mlc.ConfigDict(dict(
      encoder=encoder or ("resnet50" if size == "paper" else "resnet_tiny"), norm="batch",
      small_input=size == "tiny" or c.data.image_size <= 64, unet_widths=(32, 64, 128, 256),
      decoder_widths=(256, 128, 64, 32, 16),
      # Standardize pooled features before the classification head (linear probing).
      head_norm=False))
  c.optim.update(dict(name="adamw", lr=1e-4, schedule="cosine",
                      weight_decay=1e-3 if classification else 1e-5))
  c.train.update(dict(batch_size=32 if classification else 8,
                      num_epochs=30.0 if classification else 100.0))
  if freeze and classification:
    # Linear evaluation of a frozen encoder: the linear-probe protocol (pooled features
    # standardized by a BatchNorm without scale or bias, SGD with momentum 0.9, lr 0.1, no
    # weight decay; MoCo/MAE practice, CAMContrast Table A.1's optimizer). The paper's AdamW
    # 1e-4 is for full fine-tuning: on raw frozen features (std ~0.1 per dimension) it
    # leaves the head at the majority class (docs/results/linear_eval.md).
    c.model.head_norm = True
    c.optim.update(dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0))
  # Training augmentation (CAMContrast Table 2 fields); the identity: no augmentation.
  c.augment = mlc.ConfigDict(dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                                  rotate_degrees=0.0, fill="zero"))
  if protocol == "camcontrast":
    camcontrast_protocol(c, classification=classification, freeze=bool(freeze))
  if size == "small":  # callers set their own lr, batch and schedule length on top
    c.data.image_size = 64
    c.model.decoder_widths = (64, 32, 32, 16, 16)
    c.train.update(dict(num_epochs=0.0, num_steps=300, batch_size=32, log_every=25,
                        eval_every=100, checkpoint_every=100, eval_batch_size=64,
                        max_eval_examples=256))
  elif size == "tiny":
    c.data.image_size = 32
    c.model.decoder_widths = (32, 16, 16, 8, 8)
    config_lib.set_tiny_train(c)
  return c


def get_config(arg: str = "") -> mlc.ConfigDict:
  return finetune_config(**config_lib.parse_variant(arg, DEFAULTS, CHOICES)).lock()
