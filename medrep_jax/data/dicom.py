"""DICOM reader: CT slices in Hounsfield units (HU).

`dicom_io.read_dicom` decodes one file (or frame); `DicomFolder` is the folder reader
(`folder.FolderSource`) set up for `*.dcm` files grouped by patient folder.
"""
from __future__ import annotations

import os

from medrep_jax.data import catalog, folder
from medrep_jax.data.dicom_io import apply_window, read_dicom, to_hu  # noqa: F401 (API)
from medrep_jax.data.sources import DataError

PathLike = str | os.PathLike


class DicomFolder(folder.FolderSource):
  """All `*.dcm` files under a folder (recursive, sorted) as float32 (H, W, 1).

  Values are HU (or windowed HU, or [0, 1] with `output="unit"`, which needs a
  `window=(level, width)`). Multi-frame files: `frames="first"` (default)
  reads the first frame; `frames="all"` makes every frame its own element
  (reads every header at construction). Splits carved from one folder keep
  whole groups together: a group is the first `group_depth` path components
  below the base folder (default 1: the patient folder), so no patient is in
  two splits; `group_depth=0` splits per file. `group_by` (a regex) replaces
  `group_depth`.
  """

  def __init__(self, root: PathLike, split: str = "train", *,
               window: tuple[float, float] | None = None, output: str = "hu",
               frames: str = "first", group_depth: int = 1, group_by: str = "",
               val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
               num_folds: int = 0, fold: int = 0, split_file: str = "",
               skip_corrupt: bool = False, name: str | None = None):
    if window is not None and (len(window) != 2 or float(window[1]) <= 0):
      raise DataError(f"window must be (level, width) with width > 0, got {window!r}")
    if not group_by and group_depth > 0:
      group_by = "^(" + "/".join(["[^/]+"] * int(group_depth)) + ")/"
    spec = catalog.Spec(images="**/*.dcm", suffixes=(".dcm",), group_by=group_by,
                        group_unmatched="own", val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed, num_folds=num_folds,
                        fold=fold, split_file=split_file)
    decode = folder.Decode(window=None if window is None else tuple(map(float, window)),
                           dicom_output=output, frames=frames)
    super().__init__(root, split, spec=spec, decode=decode, channels=1,
                     skip_corrupt=skip_corrupt, name=name)
    self.window, self.output = decode.window, output
    self.elements = [(self.root / self.catalog.items[i].path, f or 0)
                     for i, f in self.entries]
