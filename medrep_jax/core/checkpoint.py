"""Orbax checkpoints of (train state, data-iterator state), and `init_from` warm starts.

A checkpoint is written only when every float leaf of the state is finite (one jitted
reduction at checkpoint steps), so the last checkpoint is always a good one; a failed
write or a restore into a state of other shapes raises an error that names the folder,
the array and what to do (DESIGN.md, principle 6).
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from medrep_jax import errors
from medrep_jax.core import state as state_lib

log = logging.getLogger(__name__)

# Config fields that set array shapes, named when a restore finds other shapes.
SHAPE_FIELDS = ("data.num_classes", "data.num_mask_classes", "data.channels",
                "data.image_size", "model.*")


class Checkpointer:
  """Saves every `every` steps and at the end, keeping the last `keep`.

  Each checkpoint holds the train state (`state`) and the grain iterator state
  (`data_iter`), so a resumed run sees the same batches as an uninterrupted one. The
  folder is created at the first save, not before.
  """

  def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self.every = int(every)
    self.keep = int(keep)
    self._manager = None
    self._closed = False

  @property
  def manager(self) -> ocp.CheckpointManager:
    """The orbax manager, made on first use (it creates the folder)."""
    if self._manager is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                             enable_async_checkpointing=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "data_iter"))
    return self._manager

  def latest_step(self) -> int | None:
    if self._manager is None and not self.directory.is_dir():
      return None
    return self.manager.latest_step()

  def kept(self) -> str:
    """Which checkpoint survives a failure, for error messages."""
    try:
      last = self.latest_step()
    except Exception:  # pylint: disable=broad-except
      last = None
    if last is None:
      return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last}) in {self.directory} is kept"

  def save(self, step: int, state, data_iter_state: dict | None, *, force: bool = False):
    """Saves `state` at `step` (async) unless it is not a checkpoint step or exists.

    Raises:
      NonFiniteError: a float leaf of the state holds NaN or Inf (nothing is written).
      WorkdirError: the write failed (disk full, read-only folder, ...).
    """
    if not force and (self.every <= 0 or step % self.every):
      return False
    if self.latest_step() is not None and step in self.manager.all_steps():
      return False
    tree = state_lib.state_dict(state)
    bad = first_nonfinite(tree)
    if bad is not None:
      raise errors.NonFiniteError(
          f"state leaf {bad!r} is NaN or Inf after step {step}; training stopped and "
          f"{self.kept()}. Lower optim.lr, set optim.grad_clip, or check the data.")
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        data_iter=ocp.args.JsonSave(_jsonable(data_iter_state or {})))
    try:
      self.manager.save(step, args=args, force=True)
    except OSError as e:
      raise self._write_error(step, e) from e
    return True

  def _write_error(self, step: int | None, e: OSError) -> errors.WorkdirError:
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    return errors.WorkdirError(
        f"could not write {what} to {self.directory}: {e.strerror or e}"
        f"{f' ({e.filename})' if e.filename else ''}. Training stopped and {self.kept()}. "
        f"Free disk space or fix the folder's permissions, then re-run the same command "
        f"to resume from that checkpoint.")

  def restore(self, state, step: int | None = None):
    """Restores into the structure and shardings of `state`; returns (state, iter_state).

    Raises:
      CheckpointMismatch: the checkpoint's arrays differ in path or shape from `state`'s
        (the config, or the data it infers sizes from, changed).
    """
    step = self.latest_step() if step is None else step
    target = jax.tree.map(_abstract, state_lib.state_dict(state))
    self._check_shapes(target, step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data_iter=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise self._mismatch(step, f"orbax could not restore it ({e})") from e
    return state_lib.from_state_dict(state, restored["state"]), dict(restored["data_iter"])

  def _mismatch(self, step: int, what: str) -> errors.CheckpointMismatch:
    return errors.CheckpointMismatch(
        f"checkpoint step {step} in {self.directory} does not fit the state this config "
        f"builds: {what}. The config, or the data it infers sizes from, changed since the "
        f"checkpoint was written; fields that set array shapes include "
        f"{', '.join(SHAPE_FIELDS)}. Re-run with the run's own config "
        f"({self.directory.parent / 'config.json'}) and data, or use a new --workdir.")

  def _check_shapes(self, target: dict, step: int) -> None:
    """Compares saved and expected array shapes by path before orbax reads any data."""
    try:
      saved = _saved_shapes(self.directory / str(step) / "state")
    except Exception:  # pylint: disable=broad-except  # no metadata: let restore decide
      return
    wanted = {p: tuple(x.shape) for p, x in
              traverse_util.flatten_dict(target, sep="/").items() if hasattr(x, "shape")}
    differ = sorted((p for p in set(saved) & set(wanted) if saved[p] != wanted[p]),
                    key=lambda p: (not p.startswith("params/"), p))  # name a parameter
    if differ:
      path, more = differ[0], len(differ) - 1
      raise self._mismatch(step, f"the array {path} has shape {saved[path]} in the "
                                 f"checkpoint but {wanted[path]} here"
                                 f"{f' ({more} more arrays differ)' if more else ''}")
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
      parts = []
      if missing:
        parts.append(f"this config builds {_few(missing)}, which the checkpoint lacks")
      if extra:
        parts.append(f"the checkpoint holds {_few(extra)}, which this config does not build")
      raise self._mismatch(step, "; ".join(parts))

  def wait(self):
    if self._manager is not None:
      try:
        self._manager.wait_until_finished()
      except OSError as e:
        raise self._write_error(None, e) from e

  def close(self):
    if self._closed:
      return
    self._closed = True
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise self._write_error(None, e) from e
    finally:
      self._manager.close()


def _few(paths: list[str], n: int = 3) -> str:
  more = f" and {len(paths) - n} more" if len(paths) > n else ""
  return ", ".join(paths[:n]) + more


def _saved_shapes(item_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """Path -> shape of every array in a saved `state` item (metadata only)."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # the step metadata is one folder up; nothing missing
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.metadata(item_dir).item_metadata.tree
  finally:
    absl_log.setLevel(level)
  flat = traverse_util.flatten_dict(tree, sep="/")
  return {p: tuple(m.shape) for p, m in flat.items() if getattr(m, "shape", None) is not None}


_FINITE_FNS: dict[Any, Any] = {}


def _finite_fn(out_sharding):
  """`leaves -> bool[n]` (is each leaf all finite), jitted once per output sharding."""
  if out_sharding not in _FINITE_FNS:
    def flags(leaves):
      return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    _FINITE_FNS[out_sharding] = jax.jit(flags, out_shardings=out_sharding)
  return _FINITE_FNS[out_sharding]


def first_nonfinite(tree: Any) -> str | None:
  """The path ("params/head/kernel") of the first float leaf holding NaN or Inf, or None.

  One jitted reduction over all float leaves and one small transfer: cheap enough for
  every checkpoint step. The flags come back replicated over the leaves' mesh, so every
  process of a multi-process run reads the same answer.
  """
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {
      jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  items = [(p, x) for p, x in flat.items()
           if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and np.size(x)]
  if not items:
    return None
  sharding = getattr(items[0][1], "sharding", None)
  out = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
         if isinstance(sharding, jax.sharding.NamedSharding) else None)
  flags = np.asarray(jax.device_get(_finite_fn(out)([x for _, x in items])))
  bad = np.flatnonzero(~flags)
  return str(items[bad[0]][0]) if len(bad) else None


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
