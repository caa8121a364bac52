"""LTDiff++ data: (A, B) kernel pairs from the config's `data` fields, and their slices.

`pair_source(data, split)` builds the split's pair source, records {"image_a", "image_b",
"index"} (A the non-standard smooth kernel, B the standard sharp one, Sec. IV-A):

  * a DICOM CT folder (`data.name="covid_ct"`, or any name with `data.root`): a
    `data.kernel_pairs.KernelPairSource`. The folder is the preset's, found as every
    preset finds its folder (`data.root`, else `$MEDREP_DATA_DIR/<preset folder>`).
    With `data.kernels=()` the pairs are simulated by FBP with the `data.simulation`
    parameters and cached once in `data.cache_dir` ("" = the shared cache,
    `$MEDREP_CACHE_DIR/kernel_pairs`, else ~/.cache/medrep_jax/kernel_pairs: every stage
    and seed with the same parameters reuses one file); `data.kernels=(A, B)` reads real
    pairs from `root/<A>/...` and `root/<B>/...`. `data.include`, a regex on each
    slice's path below the root (or kernel folder), keeps only the slices it matches,
    e.g. "/axial/" (covid_ct also holds coronal and sagittal reformats); "" keeps all.
  * `data.name="phantoms"`: `PhantomPairs`, the procedural phantoms read as HU and
    simulated on access (about 15 ms a 32 px slice): a data-free option for tests and demos.

Values (both kinds): HU clipped to the window `data.window_level` / `data.window_width`
and scaled to [0, 1] (`KernelPairSource(output="unit")`); `to_hu` inverts it.

`AToB` gives the `direct` stage (the UNet++ A -> B baseline) {"image": A, "target": B}.
`BothKernels` turns a pair source into a slice source for the `ae` stage (phase 1 trains
on all slices of both kernels, Sec. III-C): element 2k is image_a of pair k and 2k + 1 its
image_b, records {"image", "kernel" (0 = A, 1 = B), "pair", "index"}.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from medrep_jax.data import formats, kernel_pairs, registry
from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, window_of

PAIR_KEYS = ("image_a", "image_b")
# The phantoms' uint8 intensities 0..255 read linearly as HU: background air to soft
# tissue / bone-like ribs (their lungs land near -700 HU).
PHANTOM_HU = (-1000.0, 600.0)


def window(data) -> tuple[float, float]:
  """(level, width) in HU from `data.window_level` / `data.window_width` (required)."""
  w = window_of(data)
  if w is None:
    raise DataError("ltdiff needs an HU window: set data.window_level and data.window_width "
                    "(> 0), e.g. 0 and 2000 for [-1000, 1000] HU")
  return formats.check_window(w)


def to_hu(x, data):
  """Model values in [0, 1] -> HU (inverse of the window scaling)."""
  level, width = window(data)
  return (level - width / 2) + x * width


def simulation(data) -> kernel_pairs.Simulation:
  """`data.simulation` as a `Simulation` (unknown fields named)."""
  fields = {f.name for f in dataclasses.fields(kernel_pairs.Simulation)}
  given = dict(data.simulation)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise DataError(f"unknown data.simulation fields {unknown}; fields: {sorted(fields)}")
  return kernel_pairs.Simulation(**given)


class PhantomPairs(Source):
  """Kernel pairs simulated on access from `data.phantoms.Phantoms` read as HU."""

  def __init__(self, split: str, *, image_size: int, num_examples: int, seed: int,
               sim: kernel_pairs.Simulation, window_hu: tuple[float, float]):
    self.split, self.sim, self.window = split, sim, formats.check_window(window_hu)
    self.phantoms = Phantoms(split, num_examples=int(num_examples) or None,
                             image_size=int(image_size), channels=1, seed=int(seed))
    self.info = SourceInfo(name="phantoms_kernel_pairs", num_classes=0, class_names=(),
                           channels=1, image_dtype="float32")

  def _num_elements(self) -> int:
    return len(self.phantoms)

  def _load(self, index: int) -> Record:
    lo, hi = PHANTOM_HU
    hu = lo + self.phantoms[index]["image"][..., 0].astype(np.float32) * ((hi - lo) / 255)
    pair = self.sim.pair(hu, f"phantoms/{self.split}/{index}")
    return {k: formats.apply_window(v, self.window, "unit").astype(np.float32)[..., None]
            for k, v in zip(PAIR_KEYS, pair)}


class Only(Source):
  """The elements of a `KernelPairSource` whose slice path matches `pattern`."""

  def __init__(self, pairs: kernel_pairs.KernelPairSource, pattern: str):
    self.pairs, self.info = pairs, pairs.info
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise DataError(f"data.include={pattern!r} is not a regular expression: {e}") from e
    self.rows = [i for i, p in enumerate(pairs.ids) if regex.search(p)]
    self.ids = [pairs.ids[i] for i in self.rows]
    self.groups = [pairs.groups[i] for i in self.rows]

  def _num_elements(self) -> int:
    return len(self.rows)

  def _load(self, index: int) -> Record:
    record = dict(self.pairs[self.rows[index]])
    record.pop("index", None)
    return record


def pair_source(data, split: str, *, progress: bool = True) -> Source:
  """The (A, B) pair source of `split` from a data config (module docstring)."""
  sim, win = simulation(data), window(data)
  if data.name == "phantoms":
    return PhantomPairs(split, image_size=int(data.image_size),
                        num_examples=int(data.num_examples), seed=int(data.seed), sim=sim,
                        window_hu=win)
  pairs = kernel_pairs.KernelPairSource(
      registry.root_of(data), split, kernels=tuple(data.kernels), image_size=int(data.image_size),
      simulation=sim, window=win, output="unit", value_offset=float(data.value_offset),
      group_depth=int(data.group_depth), max_slices=int(data.max_slices),
      val_fraction=float(data.val_fraction), test_fraction=float(data.test_fraction),
      seed=int(data.seed), cache_dir=str(data.cache_dir) or None, progress=progress,
      name=data.name)
  if not data.include:
    return pairs
  only = Only(pairs, str(data.include))
  if not only.rows and len(pairs):
    raise DataError(f"data.include={data.include!r} matches none of the {len(pairs)} "
                    f"{split} slices under {pairs.root} (e.g. {pairs.ids[0]!r})")
  return only


def slice_info(data) -> SourceInfo:
  """What `BothKernels` gives: one float32 channel in [0, 1] (known without the data)."""
  return SourceInfo(name=f"{data.name}_kernel_slices", num_classes=0, class_names=(),
                    channels=1, image_dtype="float32")


class BothKernels(Source):
  """Both slices of every pair as separate elements: 2k -> A of pair k, 2k + 1 -> B."""

  def __init__(self, pairs: Source, info: SourceInfo | None = None):
    self.pairs = pairs
    self.info = info or SourceInfo(name=f"{pairs.info.name}_slices", num_classes=0,
                                   class_names=(), channels=1, image_dtype="float32")
    groups = getattr(pairs, "groups", None)
    self.groups = None if groups is None else [g for g in groups for _ in PAIR_KEYS]

  def _num_elements(self) -> int:
    return len(PAIR_KEYS) * len(self.pairs)

  def _load(self, index: int) -> Record:
    pair, kernel = divmod(index, len(PAIR_KEYS))
    record = self.pairs[pair]
    if PAIR_KEYS[kernel] not in record:
      raise DataError(f"{self.pairs.info.name}: element {pair} has no {PAIR_KEYS[kernel]!r} "
                      f"(keys {sorted(record)}); a kernel-pair source gives {PAIR_KEYS}")
    return {"image": np.asarray(record[PAIR_KEYS[kernel]], np.float32),
            "kernel": np.int32(kernel), "pair": np.int64(pair)}


class AToB(Source):
  """A pair source as supervised examples for the `direct` stage: {"image": A, "target": B}."""

  def __init__(self, pairs: Source, info: SourceInfo | None = None):
    self.pairs = pairs
    self.info = info or pairs.info
    self.groups = getattr(pairs, "groups", None)

  def _num_elements(self) -> int:
    return len(self.pairs)

  def _load(self, index: int) -> Record:
    record = self.pairs[index]
    return {"image": np.asarray(record["image_a"], np.float32),
            "target": np.asarray(record["image_b"], np.float32)}
