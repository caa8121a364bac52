"""`KernelPairSource`: (A, B) reconstruction-kernel pairs of CT slices (LTDiff++).

Two kinds of data give records {"image_a": (S, S, 1), "image_b": (S, S, 1), "index"},
float32, A the non-standard (smooth) kernel and B the standard one:

  * simulated (`kernels=()`): every DICOM slice under `root` (`dicom.DicomFolder`, HU,
    one group per patient folder) is resized to S x S and `ct_kernels.simulate_pair`
    makes its pair. All slices are simulated once, with a progress bar, and cached in
    one .npz under `cache_dir` whose name holds a hash of the simulation parameters, the
    image size and the files (path, size, mtime): a changed parameter or file builds a
    new cache. The file is written to a temporary name and renamed, so an interrupted
    build leaves no partial cache. Slice noise is seeded by (`Simulation.seed`, path).
  * real pairs (`kernels=(kernel_a, kernel_b)`): `root/<kernel_a>/<patient>/...` and
    `root/<kernel_b>/<patient>/...` hold the same files (DICOM in HU, or .npy/.npz/PNG/
    TIFF whose stored values plus `value_offset` are HU), paired by their path below
    the kernel folder, extension ignored; an unpaired file is an error naming it.

Splits are carved by patient (the first `group_depth` folders below the root or the
kernel folder) with `splits.carve`, as `DicomFolder` carves. Values: HU by default;
`window=(level, width)` clips to the window, and `output="unit"` maps it to [0, 1].
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import zlib

import numpy as np

from medrep_jax.fileio import atomic_file
from medrep_jax.data import ct_kernels, dicom, dicom_io, formats, imageio, splits
from medrep_jax.data.sources import DataError, Record, Source, SourceInfo, check_split

CACHE_VERSION = 1
OUTPUTS = ("hu", "unit")
PAIR_SUFFIXES = (".dcm", ".npy", ".npz", ".png", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Simulation:
  """`ct_kernels.simulate_pair` parameters (defaults: the spec's pilot); i0 = 0: no noise."""
  num_views: int = ct_kernels.DEFAULT_NUM_VIEWS
  i0: float = ct_kernels.DEFAULT_I0
  filter_a: str = ct_kernels.DEFAULT_FILTER_A
  cutoff_a: float = ct_kernels.DEFAULT_CUTOFF_A
  filter_b: str = ct_kernels.DEFAULT_FILTER_B
  cutoff_b: float = ct_kernels.DEFAULT_CUTOFF_B
  fov_mm: float = ct_kernels.DEFAULT_FOV_MM
  mu_water: float = ct_kernels.MU_WATER
  seed: int = 0

  def pair(self, hu: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The (A, B) pair of one slice; its noise is seeded by (seed, crc32(key))."""
    kw = {k: v for k, v in dataclasses.asdict(self).items() if k != "seed"}
    rng = np.random.default_rng([int(self.seed), zlib.crc32(key.encode())])
    return ct_kernels.simulate_pair(hu, **kw, rng=rng)


def default_cache_dir() -> pathlib.Path:
  """$MEDREP_CACHE_DIR/kernel_pairs, else ~/.cache/medrep_jax/kernel_pairs."""
  base = os.environ.get("MEDREP_CACHE_DIR") or os.path.expanduser("~/.cache/medrep_jax")
  return pathlib.Path(base) / "kernel_pairs"


def _resize(hu: np.ndarray, size: int) -> np.ndarray:
  hu = np.asarray(hu, np.float32)
  hu = hu[..., None] if hu.ndim == 2 else hu
  return imageio.resize_image(hu, (size, size))[..., 0]


def read_hu(path: pathlib.Path, value_offset: float) -> np.ndarray:
  """One 2-D slice in HU: DICOM through the DICOM reader, other files as stored + offset."""
  if formats.suffix_of(path) == ".dcm":
    return dicom_io.read_dicom(path)[..., 0]
  arr = np.asarray(formats.read_array(path), np.float32)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 2:
    raise DataError(f"{path} holds an array of shape {arr.shape}; a kernel pair needs one "
                    "2-D slice per file")
  return arr + np.float32(value_offset)


def slice_files(base: pathlib.Path) -> dict[str, pathlib.Path]:
  """Slice files under `base` by their relative path without extension."""
  out: dict[str, pathlib.Path] = {}
  for p in sorted(base.rglob("*")):
    if p.is_file() and formats.suffix_of(p) in PAIR_SUFFIXES:
      key = p.relative_to(base).with_name(formats.stem_of(p)).as_posix()
      if key in out:
        raise DataError(f"{out[key]} and {p} are the same slice in two formats; keep one")
      out[key] = p
  return out


def _save_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  with atomic_file(path, fsync=True) as f:
    np.savez(f, **arrays)


class KernelPairSource(Source):
  """(A, B) kernel pairs of CT slices, split by patient (see the module docstring).

  Attributes:
    ids: the relative path of each element's slice (below the root, or the kernel folder).
    groups: the patient of each element.
    cache_path: the .npz of simulated pairs (None for real pairs).
  """

  def __init__(self, root: str | os.PathLike, split: str = "train", *,
               kernels: tuple[str, ...] = (), image_size: int = 256,
               simulation: Simulation = Simulation(),
               window: tuple[float, float] | None = None, output: str = "hu",
               value_offset: float = 0.0, group_depth: int = 1, max_slices: int = 0,
               val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
               cache_dir: str | os.PathLike | None = None, progress: bool = True,
               name: str | None = None):
    check_split(split)
    if output not in OUTPUTS:
      raise DataError(f"output must be one of {OUTPUTS}, got {output!r}")
    self.window = formats.check_window(window)
    if output == "unit" and self.window is None:
      raise DataError("output='unit' needs window=(level, width) in HU, e.g. (-600, 1500)")
    if int(image_size) < 8:
      raise DataError(f"image_size must be >= 8, got {image_size}")
    self.root, self.output = pathlib.Path(root).expanduser(), output
    self.size, self.value_offset, self.cache_path = int(image_size), float(value_offset), None
    if not self.root.is_dir():
      raise DataError(f"kernel-pair data folder {self.root} does not exist or is not a folder")
    group_by = "^(" + "/".join(["[^/]+"] * max(int(group_depth), 1)) + ")/"
    if kernels:
      ids, self._files = self._pair_files(tuple(kernels))
    else:
      ids, self._files = self._simulated(simulation, cache_dir, progress, group_depth,
                                         max_slices)
    all_groups = [splits.group_of(i, group_by, unmatched="own") if group_depth else i
                  for i in ids]
    self._rows = splits.carve(ids, split, groups=all_groups, val_fraction=val_fraction,
                              test_fraction=test_fraction, seed=seed)
    self.ids = [ids[r] for r in self._rows]
    self.groups = [all_groups[r] for r in self._rows]
    self.info = SourceInfo(name=name or f"{self.root.name}_kernel_pairs", num_classes=0,
                           class_names=(), channels=1, image_dtype="float32")

  # ---------------------------------------------------------------- listing
  def _pair_files(self, kernels: tuple[str, ...]):
    if len(kernels) != 2 or kernels[0] == kernels[1]:
      raise DataError(f"kernels must name two different kernel folders (A, B), got {kernels}")
    found = []
    for k in kernels:
      base = self.root / k
      if not base.is_dir():
        raise DataError(f"kernel folder {base} does not exist (kernels={kernels}); "
                        f"expected {self.root}/<kernel>/<patient>/<slice files>")
      found.append(slice_files(base))
    a, b = found
    for mine, other, k in ((a, b, kernels[1]), (b, a, kernels[0])):
      alone = sorted(set(mine) - set(other))
      if alone:
        raise DataError(f"{mine[alone[0]]} has no pair: no {self.root / k / alone[0]}.* "
                        f"({len(alone)} unpaired file(s) in all). Pairs are matched by "
                        "their path below the kernel folder, extension ignored")
    if not a:
      raise DataError(f"no slice files ({', '.join(PAIR_SUFFIXES)}) under "
                      f"{self.root / kernels[0]}")
    ids = sorted(a)
    return ids, [(a[i], b[i]) for i in ids]

  def _simulated(self, sim: Simulation, cache_dir, progress: bool, group_depth: int,
                 max_slices: int):
    src = dicom.DicomFolder(self.root, "all", group_depth=group_depth)
    paths = [p for p, _ in src.elements]
    picks = list(range(len(paths)))
    if 0 < int(max_slices) < len(paths):  # spread over the sorted slices (all patients)
      picks = sorted(set(np.linspace(0, len(paths) - 1, int(max_slices)).round().astype(int)))
    ids = [paths[i].relative_to(self.root).as_posix() for i in picks]
    stats = [(i, paths[p].stat().st_size, paths[p].stat().st_mtime_ns)
             for i, p in zip(ids, picks)]
    key = json.dumps({"version": CACHE_VERSION, "simulation": dataclasses.asdict(sim),
                      "image_size": self.size, "root": str(self.root.resolve()),
                      "files": stats}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    self.cache_path = base / f"{self.root.name}_{digest}.npz"
    if self._cached(key):
      return ids, None
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    out_a = np.empty((len(ids), self.size, self.size), np.float32)
    out_b = np.empty_like(out_a)
    for k, (i, p) in enumerate(tqdm(list(zip(ids, picks)), desc="simulating kernel pairs",
                                    unit="slice", disable=not progress)):
      out_a[k], out_b[k] = sim.pair(_resize(src[p]["image"], self.size), i)
    _save_atomic(self.cache_path, {"image_a": out_a, "image_b": out_b,
                                   "ids": np.asarray(ids, dtype=str),
                                   "key": np.asarray(key)})
    return ids, None

  def _cached(self, key: str) -> bool:
    if not self.cache_path.is_file():
      return False
    try:
      with np.load(self.cache_path, allow_pickle=False) as f:
        ok = str(f["key"]) == key
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("kernel-pair cache %s is unreadable (%s); rebuilding it",
                      self.cache_path, e)
      return False
    return ok

  # ---------------------------------------------------------------- decoding
  def _arrays(self) -> dict[str, np.ndarray]:
    """The split's simulated pairs, loaded once per process (not pickled)."""
    if "_pairs" not in self.__dict__:
      with np.load(self.cache_path, allow_pickle=False) as f:
        self.__dict__["_pairs"] = {k: f[k][self._rows] for k in ("image_a", "image_b")}
    return self.__dict__["_pairs"]

  def __getstate__(self):
    state = self.__dict__.copy()
    state.pop("_pairs", None)
    return state

  def _num_elements(self) -> int:
    return len(self._rows)

  def _values(self, hu: np.ndarray) -> np.ndarray:
    return dicom_io.apply_window(hu, self.window, self.output).astype(np.float32)[..., None]

  def _load(self, index: int) -> Record:
    if self._files is None:
      pairs = self._arrays()
      a, b = pairs["image_a"][index], pairs["image_b"][index]
    else:
      path_a, path_b = self._files[self._rows[index]]
      a, b = (_resize(read_hu(p, self.value_offset), self.size) for p in (path_a, path_b))
    return {"image_a": self._values(a), "image_b": self._values(b)}
