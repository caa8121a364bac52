"""Quickstart: the main job end to end on procedural `phantoms`, in minutes on a laptop CPU.

  python -m medrep_jax.main --config configs/quickstart.py --workdir runs/quickstart

A two-stage pipeline on the same data:
  1. `classify`: a small ResNet learns the lesion class (normal / nodule / opacity);
  2. `segment`: a U-Net whose encoder is initialized from stage 1 (`init_from`) learns the
     lesion masks.
Each stage writes metrics.jsonl, TensorBoard events, checkpoints, figures and report.md under
WORKDIR/<stage>/, and WORKDIR/report.md links them. Re-running skips finished stages.
`colabs/quickstart.ipynb` builds the same config with `pipeline_config`.

Variant args: size=small|tiny (small: configs/finetune.py's size, a few minutes on a 2-core
CPU; tiny: a 2-step smoke test), data=<dataset with labels and masks> (default phantoms),
seed=<int>.
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

DEFAULTS = dict(size="small", data="phantoms", seed=0)
CHOICES = dict(size=("small", "tiny"), data=registry.PRESETS)


def pipeline_config(*, size: str = "small", data: str = "phantoms",
                    seed: int = 0) -> mlc.ConfigDict:
  """An unlocked two-stage pipeline config: `classify` then `segment`."""
  finetune = config_lib.config_module("finetune").finetune_config
  classify = finetune(task="classification", data=data, size=size, seed=seed)
  segment = finetune(task="segmentation", data=data, size=size, init_from="stage:classify",
                     seed=seed)
  if size == "small":
    for c in (classify, segment):
      c.model.small_input = False
      c.optim.update(dict(lr=2e-3, warmup_fraction=0.05))
  return config_lib.pipeline(dict(classify=classify, segment=segment))


def get_config(arg: str = "") -> mlc.ConfigDict:
  return pipeline_config(**config_lib.parse_variant(arg, DEFAULTS, CHOICES)).lock()
