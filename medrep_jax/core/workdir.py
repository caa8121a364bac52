"""A workdir that cannot be corrupted: the run lock and the config check.

`lock(workdir)` holds `WORKDIR/.lock` (JSON: pid, host, start time, command) while a run
uses the folder. A second run on a held workdir fails at once with `WorkdirLocked`,
naming the owner; a lock whose process is gone (same host, PID not alive) is taken over
with a printed message. Locks nest: a process that holds a folder (a pipeline root) does
not lock again below it (its stages).

`check_config` compares a run's config with the `config.json` already in the workdir
before anything is written: a finished run with another config, or a resumable one
without `allow`, raises `ConfigChanged` with the changed dotted keys; allowed changes are
appended to `config_history.jsonl` by `record_changes`. `write_json` writes atomically.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import uuid
from typing import Any, Callable, Iterator, Mapping

from medrep_jax import errors
from medrep_jax.fileio import atomic_file

LOCK_NAME = ".lock"
HISTORY_NAME = "config_history.jsonl"

# Fields that cannot change a run's results, so a resumed or finished run may differ in
# them: the progress bar, and the host-side decode threads and prefetch depth (the batch
# order depends on the seed only). A key matches itself or any `<prefix>.<key>` (the same
# field inside a pipeline stage).
IGNORED_KEYS = ("train.progress", "train.num_threads", "train.prefetch")

_HELD: dict[pathlib.Path, str | None] = {}  # workdirs this process holds -> token


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------- files


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes `obj` as JSON to `path` atomically (a killed writer leaves the old file)."""
  with atomic_file(path) as f:
    f.write((json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_config(workdir: pathlib.Path) -> dict | None:
  """The workdir's config.json as a dict, or None when there is none."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.WorkdirError(
        f"{path} is not valid JSON ({e}); the workdir may have been edited or damaged. "
        f"Restore the file, or use a new --workdir.") from e


def as_json(config) -> dict:
  """A config (ConfigDict or dict) as the plain JSON values config.json would hold."""
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(data, default=str))


# ----------------------------------------------------------------------- config check


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf} of a nested mapping (an empty mapping is a leaf)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
  return any(key == k or key.endswith("." + k) or key.startswith(k + ".") for k in ignore)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                ignore: tuple[str, ...] = IGNORED_KEYS) -> dict[str, tuple[Any, Any]]:
  """Changed leaves as dotted key -> (old, new), sorted; a missing side is `MISSING`.

  Both sides are compared as JSON values (tuples and lists are equal).
  """
  a, b = flatten(as_json(old)), flatten(as_json(new))
  changes = {}
  for key in sorted(set(a) | set(b)):
    if _ignored(key, ignore):
      continue
    va, vb = a.get(key, errors.MISSING), b.get(key, errors.MISSING)
    if va != vb:
      changes[key] = (va, vb)
  return changes


# Data fields a run may leave to the data (0 or ()); the trainer records what it found.
DATA_DERIVED = ("num_classes", "class_names", "channels", "num_mask_classes")


def derived_keys(config: Mapping[str, Any]) -> tuple[str, ...]:
  """Keys the trainer fills in from the data: `train.num_steps` when `num_epochs` > 0,
  `data_info`, and the `DATA_DERIVED` fields the config leaves to the data."""
  config = as_json(config)
  train, data = config.get("train", {}), config.get("data", {})
  keys = ["data_info"]
  if float(train.get("num_epochs", 0) or 0) > 0:
    keys.append("train.num_steps")
  keys += [f"data.{k}" for k in DATA_DERIVED if k in data and not data[k]]
  return tuple(keys)


def _short(value: Any) -> str:
  text = value if value is errors.MISSING else json.dumps(value, default=str)
  return text if len(text) <= 80 else text[:77] + "..."


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return "\n".join(f"  {k}: {_short(o)} -> {_short(n)}" for k, (o, n) in changes.items())


def field_defaults(method: str) -> dict[str, Any]:
  """Every field's default (dotted key -> JSON value) of a fresh `method` config: the base
  fields and the data fields. A field a newer release added is missing from an older run's
  config.json; at its default it describes what that run did, so it is no change."""
  from medrep_jax import config_lib  # pylint: disable=g-import-not-at-top
  from medrep_jax.data import registry  # pylint: disable=g-import-not-at-top
  base = flatten(as_json(config_lib.base_config(method)))
  base.update({f"data.{k}": v for k, v in flatten(as_json(registry.DEFAULTS)).items()})
  return base


def added_at_default(changes: dict[str, tuple[Any, Any]], method: str,
                      prefixes: tuple[str, ...] = ("",)) -> dict[str, tuple[Any, Any]]:
  """`changes` without fields missing from the old config whose new value is the default
  (`prefixes`: the stage names of a pipeline config, whose keys start with them)."""
  defaults = field_defaults(method) if method else {}

  def at_default(key: str, value: Any) -> bool:
    for prefix in prefixes:
      if prefix and not key.startswith(prefix + "."):
        continue
      rest = key[len(prefix) + 1:] if prefix else key
      if rest in defaults and defaults[rest] == value:
        return True
    return False

  return {k: (o, n) for k, (o, n) in changes.items()
          if not (o is errors.MISSING and at_default(k, n))}


def check_config(workdir: pathlib.Path, config, *, finished: bool, resume_step: int | None,
                 allow: bool, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the workdir's config.json; returns the changes to record.

  Args:
    workdir: the run directory.
    config: the new config (ConfigDict or dict).
    finished: the run in the workdir is finished (done.json).
    resume_step: the step of the checkpoint a run would resume from, or None.
    allow: `--allow_config_change`: resume with the changes instead of refusing.
    ignore: keys to ignore besides `IGNORED_KEYS`.

  Raises:
    ConfigChanged: a finished run with another config (always), or a resumable run with
      another config unless `allow`. config.json is left as it was.
  """
  workdir = pathlib.Path(workdir)
  old = read_config(workdir)
  if old is None:
    return {}
  changes = config_diff(old, config, IGNORED_KEYS + tuple(ignore))
  changes = added_at_default(changes, str(as_json(config).get("method", "")))
  if not changes:
    return {}
  listing = format_changes(changes)
  where = workdir / "config.json"
  if finished:
    raise errors.ConfigChanged(
        f"the run in {workdir} is finished, and this config differs from the one it ran "
        f"with ({where}):\n{listing}\nNothing was changed. To train with the new values use "
        f"a new --workdir (add --config.init_from={workdir} to start from this run's "
        f"weights); to see this run's results, use its original config.", changes)
  if resume_step is not None and not allow:
    raise errors.ConfigChanged(
        f"this config differs from the one the run in {workdir} was started with "
        f"({where}), and the run would resume from its checkpoint at step "
        f"{resume_step}:\n{listing}\nResuming would mix two configs in one run, so nothing "
        f"was changed. Re-run with the original values, use a new --workdir, or pass "
        f"--allow_config_change to resume with the new values (the change is recorded in "
        f"{HISTORY_NAME}).", changes)
  return changes


def record_changes(workdir: pathlib.Path, changes: Mapping[str, tuple[Any, Any]],
                   step: int | None) -> None:
  """Appends `{"time", "step", "changes": {key: {"old", "new"}}}` to config_history.jsonl."""
  if not changes:
    return
  entry = {"time": _now(), "step": step,
           "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
  with (pathlib.Path(workdir) / HISTORY_NAME).open("a") as f:
    f.write(json.dumps(entry, default=str) + "\n")


# ------------------------------------------------------------------------------- lock


def _proc_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to detect PID reuse."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  fields = stat[stat.rindex(")") + 2:].split()
  return fields[19] if len(fields) > 19 else None


def _alive(owner: Mapping[str, Any]) -> bool:
  """Whether the lock's owner may still run (another host: assume it does)."""
  if owner.get("host") != socket.gethostname():
    return True
  pid = int(owner.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, owned by another user
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    if state == "Z":
      return False  # a zombie: exited, not yet reaped
  except (OSError, IndexError):
    pass
  started = owner.get("pid_start")
  if started is not None and _proc_start(pid) not in (None, started):
    return False  # the PID now belongs to another process
  return not (pid == os.getpid() and owner.get("token") not in _HELD.values())


def describe_owner(owner: Mapping[str, Any]) -> str:
  return (f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('started')} "
          f"(command: {owner.get('command', '?')})")


def _read(path: pathlib.Path) -> dict | None:
  """The lock's JSON; {} when it is unreadable; None when it is gone."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    owner = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return owner if isinstance(owner, dict) else {}


def _create(path: pathlib.Path, info: dict) -> bool:
  """Creates the lock file with `info` atomically; False if it exists."""
  text = json.dumps(info, indent=2) + "\n"
  tmp = path.with_name(f"{path.name}.{info['token']}")
  tmp.write_text(text)
  try:
    os.link(tmp, path)  # atomic, and never shows a half-written lock
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links (some network and FUSE mounts, e.g. Google Drive)
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  finally:
    tmp.unlink(missing_ok=True)


def _remove_if(path: pathlib.Path, owner: Mapping[str, Any]) -> None:
  """Removes the lock only if it still holds `owner` (another run may have replaced it)."""
  aside = path.with_name(f"{path.name}.stale{os.getpid()}")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return
  if _read(aside) != owner:  # not ours to remove: put it back unless replaced meanwhile
    try:
      os.link(aside, path)
    except FileExistsError:
      pass
    except OSError:  # no hard links
      if not path.exists():
        os.replace(aside, path)
  aside.unlink(missing_ok=True)


def _acquire(workdir: pathlib.Path, command: str | None) -> dict:
  path = workdir / LOCK_NAME
  info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
          "pid_start": _proc_start(os.getpid()),
          "command": command if command is not None else " ".join(sys.argv),
          "token": uuid.uuid4().hex}
  for _ in range(5):
    if _create(path, info):
      return info
    owner = _read(path)
    if owner is None:
      continue  # released meanwhile
    if not owner:
      raise errors.WorkdirLocked(
          f"{path} exists but is not a lock this version wrote. If no run uses {workdir}, "
          f"delete {path} and re-run.")
    if _alive(owner):
      raise errors.WorkdirLocked(
          f"{workdir} is in use by another run: {describe_owner(owner)}. Wait for it to "
          f"finish or stop it, or use another --workdir. If you are sure no run uses this "
          f"workdir (e.g. the owner ran on another host and died), delete {path}.")
    print(f"Taking over the stale lock of {workdir}: {describe_owner(owner)} is no longer "
          f"running.")
    _remove_if(path, owner)
  raise errors.WorkdirLocked(f"could not take the lock {path}: other runs keep taking it")


def _release(workdir: pathlib.Path, info: dict) -> None:
  path = workdir / LOCK_NAME
  owner = _read(path)
  if owner and owner.get("token") == info["token"]:
    path.unlink(missing_ok=True)


def _held_here(workdir: pathlib.Path) -> bool:
  return any(workdir == p or p in workdir.parents for p in _HELD)


def _new_dirs(workdir: pathlib.Path) -> list[pathlib.Path]:
  """The folders `mkdir(parents=True)` would create, deepest first."""
  out = []
  for p in (workdir, *workdir.parents):
    if p.exists():
      break
    out.append(p)
  return out


def _cannot_write(workdir: pathlib.Path, e: OSError) -> errors.WorkdirError:
  return errors.WorkdirError(
      f"cannot write to the workdir {workdir}: {e.strerror or e} ({e.filename or workdir}). "
      f"Choose a writable --workdir or fix the folder's permissions; nothing was written.")


@contextlib.contextmanager
def lock(workdir: str | os.PathLike[str], *, command: str | None = None,
         enabled: bool = True, sync: Callable[[bool], bool] | None = None
         ) -> Iterator[dict | None]:
  """Holds `WORKDIR/.lock` while the block runs; releases it on any exit.

  The folder exists while the block runs; one this process created is removed again when
  it is still empty on exit, so a run that fails its checks leaves no trace.

  Args:
    workdir: the run directory (created if needed).
    command: recorded in the lock; default: this process's command line.
    enabled: whether this process writes the lock (only process 0 in multi-process runs).
    sync: maps this process's success to the agreement of all processes (an all-gather
      in multi-process runs), so that every process fails when process 0 cannot lock.

  Yields:
    The lock's content, or None where this process holds no lock of its own.

  Raises:
    WorkdirLocked: another live run holds the lock.
    WorkdirError: the workdir cannot be written.
  """
  workdir = pathlib.Path(workdir).absolute()
  nested = _held_here(workdir)  # a pipeline stage inside its locked root: no lock of its own
  created = _new_dirs(workdir) if enabled else []
  info, error = None, None
  if enabled:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      if not nested:
        info = _acquire(workdir, command)
    except errors.WorkdirError as e:
      error = e
    except OSError as e:
      error = _cannot_write(workdir, e)
  if nested:
    if error is not None:
      raise error
    try:
      yield None
    finally:
      _remove_empty(created)
    return
  if sync is not None and not sync(error is None) and error is None:
    error = errors.WorkdirLocked(f"process 0 could not lock {workdir}; see its message")
  if error is not None:
    if info is not None:
      _release(workdir, info)
    _remove_empty(created)
    raise error
  # Every process records the hold (process 0 with its token), so that all of them skip
  # the nested locks of a pipeline's stages alike and none waits in `sync` alone.
  _HELD[workdir] = info["token"] if info is not None else None
  try:
    yield info
  finally:
    _HELD.pop(workdir, None)
    if info is not None:
      _release(workdir, info)
    _remove_empty(created)


def _remove_empty(dirs: list[pathlib.Path]) -> None:
  for d in dirs:  # deepest first
    try:
      d.rmdir()
    except OSError:
      return
