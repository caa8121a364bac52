"""Checks of user-supplied weight files (FID Inception, LPIPS-VGG): one message format."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np


def fmt_keys(keys: Sequence[str], limit: int = 5) -> str:
  """The first `limit` keys, comma-separated, then how many more."""
  more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def key_problems(given: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *,
                 strict: bool, ignored: Callable[[str], bool] = lambda k: False
                 ) -> list[str]:
  """Missing keys (with their expected shapes), shape mismatches and, when `strict` or
  anything else is wrong, unexpected keys (other than `ignored` ones), as message parts."""
  missing = [f"{k} (expected shape {s})" for k, s in expected.items() if k not in given]
  mismatched = [f"{k}: expected shape {s}, got {tuple(np.shape(given[k]))}"
                for k, s in expected.items()
                if k in given and tuple(np.shape(given[k])) != tuple(s)]
  unexpected = [k for k in given if k not in expected and not ignored(k)]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing key(s): {fmt_keys(missing)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {fmt_keys(mismatched)}")
  if unexpected and (strict or problems):
    problems.append(f"{len(unexpected)} unexpected key(s): {fmt_keys(unexpected)}")
  return problems
