"""Atomic file writes: a killed or failing writer leaves the old file (or none), never a
partial one. Layer 0: anything may use it (run records, caches, command outputs)."""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Any]:
  """A binary file opened beside `path`, renamed onto it when the block ends without error.

  An error or a killed writer leaves the old `path` (or none) and no partial file. `fsync`
  flushes the data to disk before the rename (large caches).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
