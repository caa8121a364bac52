"""Orbax checkpoints of (train state, data-iterator state), and `init_from` warm starts."""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from medrep_jax.core import state as state_lib

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves every `every` steps and at the end, keeping the last `keep`.

  Each checkpoint holds the train state (`state`) and the grain iterator state
  (`data_iter`), so a resumed run sees the same batches as an uninterrupted one.
  """

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter_state: dict | None, *, force: bool = False):
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state_lib.state_dict(state)),
        data_iter=ocp.args.JsonSave(_jsonable(data_iter_state or {})))
    self.manager.save(step, args=args, force=True)
    return True

  def restore(self, state, step: int | None = None):
    """Restores into the structure and shardings of `state`; returns (state, iter_state)."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(_abstract, state_lib.state_dict(state))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data_iter=ocp.args.JsonRestore()))
    return state_lib.from_state_dict(state, restored["state"]), dict(restored["data_iter"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    if getattr(self, "_closed", False):
      return
    self.manager.wait_until_finished()
    self.manager.close()
    self._closed = True


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, bytes):
    return obj.decode("latin-1")
  return obj


# ----------------------------------------------------------------------------- init_from


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """Accepts a run workdir, its `checkpoints/` folder, or one step folder (made absolute:
  orbax reads metadata only from absolute paths)."""
  p = pathlib.Path(path).expanduser().absolute()
  if not p.exists():
    raise FileNotFoundError(f"{p} does not exist")
  for candidate in (p / "checkpoints", p):
    if candidate.is_dir():
      steps = sorted((int(d.name), d) for d in candidate.iterdir()
                     if d.is_dir() and d.name.isdigit() and (d / "state").is_dir()
                     and any((d / "state").iterdir()))
      if steps:
        return steps[-1][1]
  if (p / "state").is_dir():
    return p
  raise FileNotFoundError(f"no orbax checkpoint found under {p} (expected "
                          f"{p}/checkpoints/<step>/state)")


def load_state_tree(path: str | pathlib.Path) -> dict:
  """Loads the saved state dict of a checkpoint as host numpy arrays."""
  step_dir = find_checkpoint_dir(path)
  # Reading the "state" item directly makes orbax warn that the step's metadata file is
  # not in that folder; it is one level up, and nothing is missing.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    return _restore_numpy(step_dir)
  finally:
    absl_log.setLevel(level)


def _restore_numpy(step_dir: pathlib.Path) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(step_dir / "state").item_metadata
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta.tree)
    return ckptr.restore(step_dir / "state", target)


def _parse_rules(rules: str) -> list[tuple[str, str]]:
  out = []
  for rule in filter(None, (r.strip() for r in rules.split(","))):
    if ":" not in rule:
      raise ValueError(f"init_from_rules entry {rule!r} is not 'src_prefix:dst_prefix'")
    src, dst = rule.split(":", 1)
    out.append((src.strip("/"), dst.strip("/")))
  return out


def merge_by_path(target: dict, source: dict, rules: str = "") -> tuple[dict, list, list]:
  """Copies leaves of `source` into `target` where paths (after rules) and shapes match.

  Args:
    target: nested dict (e.g. `{"params": ..., "model_state": ...}`) of the new model.
    source: nested dict of a saved state.
    rules: "src_prefix:dst_prefix,..."; a source path starting with src_prefix is moved to
      dst_prefix. With no rules, identical paths match.

  Returns:
    (merged tree, loaded paths, paths left as initialized).
  """
  flat_t = traverse_util.flatten_dict(target, sep="/")
  flat_s = traverse_util.flatten_dict(source, sep="/")
  mapped = {}
  parsed = _parse_rules(rules)
  for path, value in flat_s.items():
    if not parsed:
      mapped[path] = value
    for src, dst in parsed:
      if path == src or path.startswith(src + "/"):
        mapped[dst + path[len(src):]] = value
  loaded, fresh = [], []
  for path, value in flat_t.items():
    new = mapped.get(path)
    if new is not None and tuple(new.shape) == tuple(value.shape):
      flat_t[path] = np.asarray(new).astype(value.dtype)
      loaded.append(path)
    else:
      if new is not None:
        log.warning("init_from: %s has shape %s in the checkpoint but %s here; left new",
                    path, new.shape, value.shape)
      fresh.append(path)
  return traverse_util.unflatten_dict(flat_t, sep="/"), loaded, fresh
