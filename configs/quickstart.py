"""Quickstart: the main job end to end on procedural `phantoms`, in minutes on a laptop CPU.

  python -m medrep_jax.main --config configs/quickstart.py --workdir runs/quickstart

A two-stage pipeline on the same data:
  1. `classify`: a small ResNet learns the lesion class (normal / nodule / opacity);
  2. `segment`: a U-Net whose encoder is initialized from stage 1 (`init_from`) learns the
     lesion masks.
Each stage writes metrics.jsonl, TensorBoard events, checkpoints, figures and report.md under
WORKDIR/<stage>/, and WORKDIR/report.md links them. Re-running skips finished stages.

Variant args: size=small|tiny (tiny: a 2-step smoke test), data=<dataset> (default phantoms),
seed=<int>.
"""
from medrep_jax import config_lib
from medrep_jax.presets.quickstart import quickstart_config

DEFAULTS = dict(size="small", data="phantoms", seed=0)


def get_config(arg: str = ""):
  config = quickstart_config(**config_lib.parse_variant(arg, DEFAULTS))
  config.lock()
  return config
