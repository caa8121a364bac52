"""LDM: KL-VAE + latent ε-prediction UNet for synthetic images (dual-stream paper, Stage 1).

  python -m medrep_jax.main --config configs/ldm.py:data=kermany,size=small --workdir runs/ldm

Variant args:
  stage=all|vae|unet|sample|filter  (all: the four-stage pipeline; a single stage needs
        --config.vae_from=<vae run> and, for sample, --config.unet_from=<unet run>)
  size=paper|small|tiny  data=<dataset> (kermany: grey chest X-ray; kvasir_seg: RGB;
        covid19_radiography / kvasir_seg_tfds / isic2018: manual-download TFDS sets)
  seed=<int>
"""
from medrep_jax import config_lib
from medrep_jax.presets.ldm import ldm_pipeline_config, ldm_stage_config

DEFAULTS = dict(stage="all", size="paper", data="kermany", seed=0)


def get_config(arg: str = ""):
  a = config_lib.parse_variant(arg, DEFAULTS)
  if a["stage"] == "all":
    config = ldm_pipeline_config(data=a["data"], size=a["size"], seed=a["seed"])
  else:
    config = ldm_stage_config(a["stage"], data=a["data"], size=a["size"], seed=a["seed"])
  config.lock()
  return config
