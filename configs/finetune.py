"""Fine-tuning: classification (linear head, BCE eq. 8) or U-Net segmentation (eq. 9).

  python -m medrep_jax.main --config configs/finetune.py:task=segmentation,data=kvasir_seg \
      --workdir runs/ft_seg --config.init_from=runs/pretrain

Variant args: task=classification|segmentation, size=paper|tiny, data=<dataset>,
encoder=<resnet18|resnet50|resnet_tiny|unet_encoder>, init_from=<run dir>, freeze=True|False,
label_fraction=<0..1>, seed=<int>.
"""
from medrep_jax import config_lib
from medrep_jax.presets.finetune import finetune_config

DEFAULTS = dict(task="classification", size="paper", data="phantoms", encoder=None,
                init_from="", freeze=False, label_fraction=1.0, seed=0)


def get_config(arg: str = ""):
  a = config_lib.parse_variant(arg, DEFAULTS)
  config = finetune_config(**a)
  config.lock()
  return config
