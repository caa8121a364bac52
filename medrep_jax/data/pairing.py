"""Path patterns and image/mask pairing rules.

A pattern is a path relative to the data root, in `/` form, with:
  `*`       any text inside one path component;
  `**`      as a whole component: zero or more folders;
  `?`       one character inside a component;
  `{name}`  a named part: some text inside one component, captured. A name used
            twice must match the same text both times.

Examples: `"images/*.jpg"`, `"**/img/{case}.bmp"`, `"{split}/images/{id}_{tag}.tif"`.

An image pattern lists the images (files of a supported format only) and names
their parts. A mask rule maps each image to its masks:
  * a mask pattern: a format string over the image's named parts and the built-in
    parts `path` (the image path), `dir` (its folder), `name` (file name), `stem`
    (name without extension, `.nii.gz` counted as one) and `ext`; the filled-in
    string is a pattern (`*` allowed), so one image may have several masks, e.g.
    `"{dir}/../seg/{stem}_seg.*"` or `"{dir}/{stem}_rater*.png"`;
  * or a regex substitution `(regex, replacement)` on the image path (`re.sub`),
    whose result is read the same way.

Files that are some image's mask are never images themselves, so masks may sit
beside the images. Images with no mask are reported in `skipped` with the reason.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import posixpath
import re
from typing import Iterable, Sequence

from medrep_jax.data.sources import DataError

BUILTIN_PARTS = ("path", "dir", "name", "stem", "ext")
_MULTI_EXT = (".nii.gz", ".tar.gz")
_TOKEN = re.compile(r"\*\*|\*|\?|\{[A-Za-z_][A-Za-z0-9_]*\}")
INSPECT_HINT = "python -m medrep_jax.data inspect --config ..."


def split_ext(name: str) -> tuple[str, str]:
  """("case.nii", ".gz") is wrong for volumes: returns ("case", ".nii.gz")."""
  low = name.lower()
  for ext in _MULTI_EXT:
    if low.endswith(ext) and len(name) > len(ext):
      return name[:-len(ext)], name[-len(ext):]
  stem, ext = posixpath.splitext(name)
  return stem, ext


def builtin_parts(rel: str) -> dict[str, str]:
  """The built-in named parts of a relative path."""
  folder, name = posixpath.split(rel)
  stem, ext = split_ext(name)
  return {"path": rel, "dir": folder or ".", "name": name, "stem": stem, "ext": ext}


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern:
  """Regex of a pattern (whole-path match, case-insensitive)."""
  pattern = pattern.strip().strip("/")
  if not pattern:
    raise DataError("empty path pattern")
  out, pos, seen = [], 0, set()
  for m in _TOKEN.finditer(pattern):
    out.append(re.escape(pattern[pos:m.start()]))
    tok = m.group()
    start_of_part = m.start() == 0 or pattern[m.start() - 1] == "/"
    end_of_part = m.end() == len(pattern) or pattern[m.end()] == "/"
    if tok == "**" and start_of_part and end_of_part:
      if m.end() < len(pattern):
        out.append("(?:[^/]+/)*")
        pos = m.end() + 1  # the "/" after "**" is part of the repetition
        continue
      out.append(".*")
    elif tok in ("**", "*"):
      out.append("[^/]*")
    elif tok == "?":
      out.append("[^/]")
    else:
      name = tok[1:-1]
      out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
      seen.add(name)
    pos = m.end()
  out.append(re.escape(pattern[pos:]))
  try:
    return re.compile("".join(out), re.IGNORECASE)
  except re.error as e:
    raise DataError(f"bad path pattern {pattern!r}: {e}") from e


def part_names(pattern: str) -> list[str]:
  """The named parts `{name}` of a pattern, in order, without repeats."""
  names = [t[1:-1] for t in _TOKEN.findall(pattern) if t.startswith("{")]
  return list(dict.fromkeys(names))


def has_wildcard(pattern: str) -> bool:
  return any(t in ("*", "**", "?") for t in _TOKEN.findall(pattern))


def fill(template: str, parts: dict[str, str], *, field: str) -> str:
  """Fills `{name}` in `template` from `parts` and normalizes `..` and `.`."""
  def sub(m):
    name = m.group()[1:-1]
    if name not in parts:
      raise DataError(
          f"{field}={template!r} uses {{{name}}}, which the image path does not give; "
          f"parts known: {sorted(parts)}. Name it in the image pattern (data.images) or use a "
          f"built-in part {list(BUILTIN_PARTS)}. Check with `{INSPECT_HINT}`")
    return parts[name]
  filled = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", sub, template)
  filled = posixpath.normpath(filled)
  return "" if filled == "." else filled


class FileIndex:
  """Every file under a root, listed once: relative `/` paths by folder."""

  def __init__(self, root: pathlib.Path, *, keep=None):
    self.root = root
    self.files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      rel_dir = pathlib.Path(dirpath).relative_to(root).as_posix()
      for f in sorted(filenames):
        if f.startswith(".") or (keep is not None and not keep(f)):
          continue
        self.files.append(f if rel_dir == "." else f"{rel_dir}/{f}")
    self.by_dir: dict[str, list[str]] = {}
    for rel in self.files:
      self.by_dir.setdefault(posixpath.dirname(rel).lower(), []).append(rel)
    self.lower = {rel.lower(): rel for rel in self.files}

  def glob(self, pattern: str) -> list[str]:
    """Files matching a (filled) pattern, sorted."""
    if not pattern:
      return []
    if not has_wildcard(pattern):
      hit = self.lower.get(pattern.lower())
      return [hit] if hit else []
    folder = posixpath.dirname(pattern)
    regex = compile_pattern(pattern)
    pool = self.files if has_wildcard(folder) else self.by_dir.get(folder.lower(), [])
    return [f for f in pool if regex.fullmatch(f)]

  def match(self, pattern: str) -> list[tuple[str, dict[str, str]]]:
    """(path, named parts) of every file matching `pattern`."""
    regex = compile_pattern(pattern)
    out = []
    for rel in self.files:
      m = regex.fullmatch(rel)
      if m:
        out.append((rel, m.groupdict()))
    return out


@dataclasses.dataclass
class Candidate:
  """An image file found by the image pattern, with its named parts and masks."""
  path: str
  parts: dict[str, str]
  masks: tuple[str, ...] = ()
  roi: str | None = None


@dataclasses.dataclass(frozen=True)
class MaskRule:
  """How an image's path gives its mask paths.

  Attributes:
    pattern: a mask pattern (see the module docstring); "" = none.
    sub: (regex, replacement) applied to the image path; () = none.
    choose: a regex searched in each mask's file name; only masks it finds are
      kept ("" keeps all).
    field: the config field named in errors.
  """
  pattern: str = ""
  sub: tuple[str, ...] = ()
  choose: str = ""
  field: str = "data.mask"

  def __post_init__(self):
    if self.pattern and self.sub:
      raise DataError(f"give either {self.field} (a pattern) or {self.field}_sub "
                      f"(regex, replacement), not both")
    if self.sub and len(self.sub) != 2:
      raise DataError(f"{self.field}_sub must be (regex, replacement), got {self.sub!r}")

  @property
  def active(self) -> bool:
    return bool(self.pattern or self.sub)

  def target(self, cand: Candidate) -> str:
    """The (filled) mask pattern of one image."""
    if self.sub:
      try:
        text = re.sub(self.sub[0], self.sub[1], cand.path)
      except re.error as e:
        raise DataError(f"{self.field}_sub={tuple(self.sub)!r}: bad regex: {e}") from e
      if text == cand.path:
        return ""
      return fill(text, {**builtin_parts(cand.path), **cand.parts}, field=self.field + "_sub")
    return fill(self.pattern, {**builtin_parts(cand.path), **cand.parts}, field=self.field)

  def find(self, index: FileIndex, cand: Candidate) -> list[str]:
    found = [m for m in index.glob(self.target(cand)) if m != cand.path]
    if self.choose:
      found = [m for m in found if re.search(self.choose, posixpath.basename(m))]
    return found


def find_candidates(index: FileIndex, pattern: str, *, supported) -> list[Candidate]:
  """Images matching `pattern` whose format is supported."""
  return [Candidate(rel, parts) for rel, parts in index.match(pattern)
          if supported(rel)]


def pair(index: FileIndex, candidates: Sequence[Candidate], mask: MaskRule, roi: MaskRule,
         ) -> tuple[list[Candidate], list[tuple[str, str]]]:
  """Attaches masks (and region masks) to the images; drops files that are masks.

  Returns:
    (paired images, skipped (path, reason) pairs).
  """
  if not mask.active:
    return list(candidates), []
  found = {c.path: mask.find(index, c) for c in candidates}
  used = {m for ms in found.values() for m in ms}
  rois = {}
  if roi.active:
    rois = {c.path: roi.find(index, c) for c in candidates if c.path not in used}
    used |= {m for ms in rois.values() for m in ms}
  out, skipped = [], []
  for c in candidates:
    if c.path in used:
      continue  # a mask (or region mask) of another image
    masks = found[c.path]
    if not masks:
      want = mask.target(c) or f"(no change by {mask.field}_sub={tuple(mask.sub)!r})"
      skipped.append((c.path, f"no mask: looked for {want} ({mask.field}"
                      f"{'_sub' if mask.sub else ''}"
                      f"{', ' + mask.field + '_choose=' + repr(mask.choose) if mask.choose else ''})"))
      continue
    region = None
    if roi.active:
      if not rois.get(c.path):
        skipped.append((c.path, f"no region mask: looked for {roi.target(c)} ({roi.field})"))
        continue
      region = rois[c.path][0]
    out.append(dataclasses.replace(c, masks=tuple(masks), roi=region))
  return out, skipped


def describe(paths: Iterable[str], limit: int = 5) -> str:
  """"a, b, c and 12 more" for error messages."""
  paths = list(paths)
  head = ", ".join(paths[:limit])
  return head + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
