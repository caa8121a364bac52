"""Reading another run's outputs: its resolved config and its saved state."""
from __future__ import annotations

import json
import pathlib

import ml_collections as mlc

from medrep_jax.train import checkpoint as ckpt_lib


def load_run(path: str | pathlib.Path) -> tuple[mlc.ConfigDict, dict]:
  """Returns (config, state tree of numpy arrays) of the run in `path`.

  `path` is a run workdir (holding config.json and checkpoints/). The state tree has the
  keys of `TrainState`: params, model_state, extras, opt_state, step.
  """
  path = pathlib.Path(path)
  cfg_path = path / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: {path} is not a medrep_jax run "
                            f"directory (or the run has not started)")
  config = mlc.ConfigDict(json.loads(cfg_path.read_text()))
  return config, ckpt_lib.load_state_tree(path)
