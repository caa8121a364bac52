"""Reading a finished (or running) run: its resolved config and its saved state.

`load_run(path)` is the one place that reads a workdir. Rebuilding the run's model on top
of it is `medrep_jax.methods.load_trained`, which asks the run's own stage for its model.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections as mlc

from medrep_jax.core import checkpoint as ckpt_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """A run directory's config and saved state (host numpy arrays).

  Attributes:
    path: the run workdir.
    config: the resolved config the run wrote to config.json.
    state: the saved `TrainState` as a dict: params, model_state, extras, opt_state, step.
  """
  path: pathlib.Path
  config: mlc.ConfigDict
  state: dict

  @property
  def params(self) -> dict:
    return self.state["params"]

  @property
  def extras(self) -> dict:
    return self.state.get("extras", {})

  @property
  def step(self) -> int:
    return int(self.state.get("step", 0))

  def variables(self, submodule: str | None = None) -> dict[str, Any]:
    """Flax variables `{"params": ..., **collections}` of the model or one submodule.

    With `submodule="encoder"`, the `encoder` subtree of the params and of every model-state
    collection that has one (e.g. batch_stats), as the submodule's own `apply` expects.
    """
    collections = {"params": self.params, **self.state.get("model_state", {})}
    if submodule is None:
      return collections
    if submodule not in self.params:
      raise KeyError(f"run {self.path} has no '{submodule}' parameters; top-level "
                     f"submodules: {sorted(self.params)}")
    return {col: tree[submodule] for col, tree in collections.items()
            if isinstance(tree, dict) and submodule in tree}


_CACHE: dict[tuple[str, str], Run] = {}


def load_run(path: str | pathlib.Path, *, method: str | None = None,
             stage: str | None = None) -> Run:
  """Loads the run in `path` (a workdir holding config.json and checkpoints/).

  Args:
    path: the run workdir (or its checkpoints/ folder, or one step folder of it).
    method: if given, the run must be of this method (`config.method`).
    stage: if given, the run must be this stage (`config.stage`).

  Returns:
    The `Run`; loads are cached per (workdir, latest checkpoint).

  Raises:
    FileNotFoundError: `path` is not a run directory or has no checkpoint.
    ValueError: the run is of another method or stage.
  """
  given = pathlib.Path(path).expanduser().absolute()
  # A workdir, its checkpoints/ folder or one step folder: the run root holds config.json.
  path = next((p for p in (given, given.parent, given.parent.parent)
               if (p / "config.json").exists()), None)
  if path is None:
    raise FileNotFoundError(f"{given / 'config.json'} not found: {given} is not a medrep_jax "
                            f"run directory (or the run has not started)")
  cfg_path = path / "config.json"
  config = mlc.ConfigDict(json.loads(cfg_path.read_text()))
  want = {"method": method, "stage": stage}
  for key, value in want.items():
    if value is not None and config.get(key, "") != value:
      got = ", ".join(f"{k}={config.get(k, '')!r}" for k in want)
      expected = ", ".join(f"{k}={v!r}" for k, v in want.items() if v is not None)
      raise ValueError(f"{path} is a run with {got}; expected {expected}")
  step_dir = ckpt_lib.find_checkpoint_dir(given)
  key = (str(path), str(step_dir))
  if key not in _CACHE:
    _CACHE[key] = Run(path=path, config=config, state=ckpt_lib.load_state_tree(step_dir))
  return _CACHE[key]
