"""Quickstart: the main job end to end on procedural `phantoms`, in minutes on a laptop CPU.

  python -m medrep_jax.main --config configs/quickstart.py --workdir runs/quickstart

A two-stage pipeline on the same data:
  1. `classify`: a small ResNet learns the lesion class (normal / nodule / opacity);
  2. `segment`: a U-Net whose encoder is initialized from stage 1 (`init_from`) learns the
     lesion masks.
Each stage writes metrics.jsonl, TensorBoard events, checkpoints, figures and report.md under
WORKDIR/<stage>/, and WORKDIR/report.md links them. Re-running skips finished stages.

Variant args: size=small|tiny (tiny: a 2-step smoke test), data=<dataset> (default phantoms).
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.presets.finetune import finetune_config

DEFAULTS = dict(size="small", data="phantoms", seed=0)


def get_config(arg: str = ""):
  a = config_lib.parse_variant(arg, DEFAULTS)
  if a["size"] not in ("small", "tiny"):
    raise config_lib.ConfigError(f"size={a['size']!r}; quickstart takes small or tiny")
  tiny = a["size"] == "tiny"
  stage_size = "tiny" if tiny else "paper"
  classify = finetune_config(task="classification", data=a["data"], size=stage_size,
                             encoder="resnet_tiny", seed=a["seed"])
  segment = finetune_config(task="segmentation", data=a["data"], size=stage_size,
                            encoder="resnet_tiny", init_from="stage:classify", seed=a["seed"])
  if not tiny:
    for c, steps in ((classify, 300), (segment, 300)):
      c.data.image_size = 64
      c.model.small_input = False
      c.model.decoder_widths = (64, 32, 32, 16, 16)
      c.optim.lr = 2e-3
      c.optim.warmup_fraction = 0.05
      c.train.batch_size = 32
      c.train.num_epochs = 0.0
      c.train.num_steps = steps
      c.train.log_every = 25
      c.train.eval_every = 100
      c.train.checkpoint_every = 100
      c.train.eval_batch_size = 64
      c.train.max_eval_examples = 256
  config = mlc.ConfigDict()
  config.stages = ("classify", "segment")
  config.classify = classify
  config.segment = segment
  config.lock()
  return config
