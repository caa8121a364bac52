"""A radiomic concordance study: features of paired slice sets and Lin's CCC per class.

`concordance_study({set: folder, "reference": folder}, output)` pairs slices by file name
across the folders, samples the same ROIs in every set (per HU window, `rois.sample_rois`,
or from masks), extracts every feature (`extract`), and writes into `output`:

  - features.csv: one row per set x window x ROI (box, pixel count, every feature);
  - ccc.csv: per window x feature, its class and CCC(set, reference) for every set;
  - ccc_table.md: Table I of LTDiff++: mean +- std of the CCC over each class's features,
    one row per set, for all windows together and per window;
  - ccc_bars.png: those means as grouped bars with std error bars.

`python -m medrep_jax.radiomics` is its command line; the LTDiff++ `evaluate` stage calls
it on translated slices.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import sys
import zlib
from typing import Sequence

import numpy as np

from medrep_jax.data import formats, kernel_pairs
from medrep_jax.data.sources import DataError
from medrep_jax.eval import concordance, figures
from medrep_jax.eval.radiomics import CLASSES, feature_class, rois, stack
from medrep_jax.fileio import atomic_file

BASELINE, REFERENCE = "images", "reference"
MASK_WINDOW = "mask"


def pair_folders(folders: dict[str, str], skip_unpaired: bool = False
                 ) -> tuple[list[str], dict[str, dict[str, pathlib.Path]]]:
  """(sorted keys present in every folder, {set: {key: path}}); unpaired files raise."""
  files = {}
  for name, folder in folders.items():
    base = pathlib.Path(folder).expanduser()
    files[name] = kernel_pairs.slice_files(base)
    if not base.is_dir() or not files[name]:
      raise DataError(f"no slice files ({', '.join(kernel_pairs.PAIR_SUFFIXES)}) in the "
                      f"{name} folder {base}")
  common = set.intersection(*(set(f) for f in files.values()))
  lost = sorted(str(p) for f in files.values() for k, p in f.items() if k not in common)
  if lost and not skip_unpaired:
    raise DataError(f"{len(lost)} file(s) have no partner of the same name in every folder "
                    f"({', '.join(folders)}): {', '.join(lost[:10])}"
                    f"{' ...' if len(lost) > 10 else ''}. Pass --skip-unpaired to drop them")
  if not common:
    raise DataError(f"no file name is shared by all the folders {list(folders.values())}")
  return sorted(common), files


def _write(path: pathlib.Path, data: str | bytes) -> None:
  with atomic_file(path) as f:
    f.write(data.encode() if isinstance(data, str) else data)


def _csv(rows: list[list]) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue()


def _cell(mean: float, std: float) -> str:
  return "n/a" if not np.isfinite(mean) else f"{mean:.2f} ± {std:.2f}"


def format_table(summaries: dict[str, dict]) -> list[str]:
  lines = [f"| set | {' | '.join(CLASSES)} |", "|---" * (len(CLASSES) + 1) + "|"]
  for name, s in summaries.items():
    lines.append(f"| {name} | " + " | ".join(_cell(*s[c][:2]) for c in CLASSES) + " |")
  return lines


def _bars(pooled: dict[str, dict], path: pathlib.Path) -> None:
  """Grouped bars (a cluster per class, a bar per set) of the mean CCC, std error bars."""
  panel = "all windows"
  mean = {panel: {c: [s[c][0] for s in pooled.values()] for c in CLASSES}}
  std = {panel: {c: [s[c][1] for s in pooled.values()] for c in CLASSES}}
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    figures.paired_bar_figure(mean, list(pooled), tmp, ylabel="CCC vs reference (mean ± std)",
                              errors=std, value_labels=False)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _collect(files: dict, keys: list[str], names: list[str], masked: bool, windows: list[str],
             value_offset: float, seed: int, progress: bool, **kw) -> tuple[dict, list]:
  """({window: {set: [feature dict per ROI]}}, features.csv rows) over all slices."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  feats = {w: {n: [] for n in names} for w in windows}
  rows = []
  for key in tqdm(keys, desc="radiomics", unit="img", disable=not progress, file=sys.stdout):
    images = {n: kernel_pairs.read_hu(files[n][key], value_offset) for n in names}
    given = None
    if masked:
      mask = formats.read_array(files[MASK_WINDOW][key])
      mask = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
      if mask.shape != images[REFERENCE].shape:
        raise DataError(f"mask {files[MASK_WINDOW][key]} has shape {mask.shape}, its image "
                        f"{files[REFERENCE][key]} {images[REFERENCE].shape}")
      given = {MASK_WINDOW: rois.rois_from_mask(mask)}
    got = rois.image_features(images, REFERENCE, windows=windows, rois=given,
                              rng=np.random.default_rng([seed, zlib.crc32(key.encode())]),
                              **kw)
    for w, (chosen, per_set) in got.items():
      for n in names:
        feats[w][n] += per_set[n]
        rows += [[n, key, w, i, roi.row, roi.col, *roi.mask.shape, int(roi.mask.sum()),
                  *(f"{v:.9g}" for v in f.values())]
                 for i, (roi, f) in enumerate(zip(chosen, per_set[n]))]
  return feats, rows


def _markdown(folders: dict, n_slices: int, ranges: dict, counts: dict, table: dict,
              pooled: dict, classes: list[str]) -> str:
  md = ["# Radiomic feature concordance (Lin's CCC) against the reference", "",
        f"Folders: {', '.join(f'{n} = {d}' for n, d in folders.items())}; {n_slices} "
        "slices. Cells: mean ± std of the per-feature CCC (across ROIs) over the "
        "features of each class, as in Table I of LTDiff++.", "",
        f"## All windows ({', '.join(table)}; every window x feature CCC)", "",
        *format_table(pooled)]
  for w, per_set in table.items():
    md += ["", f"## {w}: [{ranges[w][0]:g}, {ranges[w][1]:g}] HU, {counts[w]} ROIs", "",
           *format_table({n: concordance.class_summary(c, classes) for n, c in per_set.items()})]
  skipped = [f"{w} ({n} ROIs)" for w, n in counts.items() if w not in table]
  if skipped:
    md += ["", f"Skipped, fewer than 2 ROIs: {', '.join(skipped)}."]
  return "\n".join(md) + "\n"


def concordance_study(sets: dict[str, str], output: str, *, masks: str | None = None,
                      windows: Sequence[str] = rois.WINDOWS, roi_size: int = 24,
                      rois_per_image: int = 20, min_fraction: float = 0.5,
                      bins: int | None = 32, bin_width: float | None = None,
                      mask_range: tuple[float, float] = rois.WHOLE_RANGE,
                      value_offset: float = 0.0, seed: int = 0, skip_unpaired: bool = False,
                      overwrite: bool = False, progress: bool = True) -> dict:
  """Runs the study (module docstring) on {set: folder}, "reference" among them.

  Returns {"pooled": {set: {class: (mean, std, n)}}, "rois": {window: n}, "output": dir}.
  """
  out = pathlib.Path(output).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise FileExistsError(f"the output folder {out} is not empty; choose another or pass "
                          "--overwrite to replace the files this command writes")
  folders = dict(sets, **({MASK_WINDOW: masks} if masks else {}))
  keys, files = pair_folders(folders, skip_unpaired)
  windows = [MASK_WINDOW] if masks else list(windows)
  ranges = {**rois.RANGES, MASK_WINDOW: tuple(mask_range)}
  feats, rows = _collect(files, keys, list(sets), bool(masks), windows, value_offset, seed,
                         progress, size=roi_size, count=rois_per_image,
                         min_fraction=min_fraction, n_bins=bins, bin_width=bin_width,
                         ranges=ranges)
  counts = {w: len(feats[w][REFERENCE]) for w in windows}
  used = [w for w in windows if counts[w] >= 2]
  if not used:
    raise DataError(f"no window has the 2 ROIs a CCC needs (ROIs found: {counts}); lower "
                    "--roi-size or --min-fraction, or add slices")
  names, _ = stack(feats[used[0]][REFERENCE])
  classes = [feature_class(f) for f in names]
  compared = [n for n in sets if n != REFERENCE]
  table = {w: {n: rois.paired_ccc(stack(feats[w][n])[1], stack(feats[w][REFERENCE])[1])
               for n in compared} for w in used}
  pooled = {n: concordance.class_summary(np.concatenate([table[w][n] for w in used]),
                                         classes * len(used)) for n in compared}
  out.mkdir(parents=True, exist_ok=True)
  head = ["set", "image", "window", "roi", "row", "col", "height", "width", "n_pixels"]
  _write(out / "features.csv", _csv([head + names] + rows))
  _write(out / "ccc.csv", _csv([["window", "feature", "class", "n_rois", *compared]] + [
      [w, f, c, counts[w], *(f"{table[w][n][j]:.6g}" for n in compared)]
      for w in used for j, (f, c) in enumerate(zip(names, classes))]))
  _write(out / "ccc_table.md", _markdown(folders, len(keys), ranges, counts, table, pooled,
                                         classes))
  _bars(pooled, out / "ccc_bars.png")
  return {"pooled": pooled, "rois": counts, "output": str(out)}
