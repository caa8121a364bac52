"""DCL-CsTP pretraining (dual-stream paper, Section III) and its baselines/ablations.

  python -m medrep_jax.main --config configs/dcl_cstp.py:data=kermany,size=small \
      --workdir runs/dcl_cstp

Variant args: variant=dcl_cstp|simclr|mocov2|simsiam|no_global|no_local|mlp_projector|
standard_attention, size=paper|small|tiny, data=<dataset>, task=classification|segmentation
(sets the bank size K: 4096 or 512), synthetic_ratio=<0..1> (with
--config.synthetic_dir=<ldm images/ folder>), seed=<int>.
"""
from medrep_jax import config_lib
from medrep_jax.presets.dcl_cstp import dcl_cstp_config

DEFAULTS = dict(variant="dcl_cstp", size="paper", data="kermany", task="classification",
                synthetic_ratio=0.0, seed=0)


def get_config(arg: str = ""):
  config = dcl_cstp_config(**config_lib.parse_variant(arg, DEFAULTS))
  config.lock()
  return config
