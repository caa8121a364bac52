"""Command-line entry point.

    python -m medrep_jax.main --config configs/quickstart.py[:size=tiny,data=phantoms] \
        --workdir runs/quickstart [--config.train.num_steps=100]

The config file's `get_config(arg)` receives the text after ':'. Overrides of unknown keys
fail with a "Did you mean" message (locked ml_collections configs). Re-running a command
with the same workdir resumes (or finishes at once if the run is done).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file "
                                          "[:variant args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (outputs, checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "(multi-host runs; also enabled by MEDREP_DISTRIBUTED=1).")


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/quickstart.py")
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(
      os.path.basename(flags.FLAGS["config"].config_filename))[0])
  for name in ("absl", "jax._src.xla_bridge"):  # keep the console for the run's own output
    logging.getLogger(name).setLevel(logging.WARNING)

  from medrep_jax.core import mesh as mesh_lib
  mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value or config.get("distributed", False))

  import jax
  from medrep_jax.train import pipeline, trainer
  print(f"medrep_jax: {jax.process_count()} process(es), {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); workdir {os.path.abspath(workdir)}")
  if pipeline.is_pipeline(config):
    pipeline.run_pipeline(config, workdir)
  else:
    trainer.train_and_evaluate(config, workdir)
  print(f"Done. Report: {os.path.join(os.path.abspath(workdir), 'report.md')}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
