"""Radiomic feature concordance (Lin's CCC) of CT slices against a reference (LTDiff++ IV-B).

    python -m medrep_jax.radiomics --images A/ --reference B/ --compare ltdiff=A_prime/ \
        --output ccc/ [--windows lung,soft,soft_narrow,bone,whole] [--roi-size 24] \
        [--rois-per-image 20] [--bins 32] [--seed 0]

Slices are paired by file name without extension (and sub-folder) across the folders: A
(`--images`, the baseline, named "images"), B (`--reference`) and every `--compare
NAME=DIR` (e.g. translated A'). An unpaired file is an error naming it (`--skip-unpaired`
drops it). One 2-D slice per file, read as `KernelPairSource` reads real pairs: DICOM
.dcm in HU (rescale slope/intercept applied); .npy/.npz and 16-bit PNG/TIFF as stored +
`--value-offset` = HU (default 0, arrays already in HU; PNGs saved as HU + 1024 need
`--value-offset -1024`).

ROIs (`eval/radiomics/rois.py`): per slice and HU window, up to `--rois-per-image` random
`--roi-size` boxes whose B pixels are in the window (the in-window pixels are the mask),
the same boxes for every set; "whole" is the whole slice. `--masks DIR` replaces the
windows: one ROI per non-zero label of each mask file. Grey levels: `--bins` fixed bins
over each window's HU range (or `--bin-width` HU).

Writes into `--output` (refused when not empty, unless `--overwrite`):
  - features.csv: one row per set x window x ROI (box, pixel count, every feature);
  - ccc.csv: per window x feature, its class and CCC(set, reference) for every set;
  - ccc_table.md: Table I of the paper: mean +- std of the CCC over each class's features,
    one row per set, for all windows together and per window;
  - ccc_bars.png: those means as grouped bars with std error bars.
"""
from __future__ import annotations

import argparse
import re
from typing import Sequence

from medrep_jax import errors
from medrep_jax.eval.radiomics import rois
from medrep_jax.eval.radiomics.study import (BASELINE, MASK_WINDOW, REFERENCE,
                                             concordance_study, format_table)

def _compare(text: str) -> tuple[str, str]:
  name, eq, folder = text.partition("=")
  if not eq or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not folder:
    raise argparse.ArgumentTypeError(f"--compare takes NAME=DIR (NAME of letters, digits, "
                                     f"_ . + -), got {text!r}")
  return name, folder


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m medrep_jax.radiomics",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 2)[2])
  p.add_argument("--images", required=True, help="the baseline slices (A), in HU")
  p.add_argument("--reference", required=True, help="the reference slices (B), in HU")
  p.add_argument("--compare", action="append", type=_compare, default=[], metavar="NAME=DIR",
                 help="another set compared with the reference (repeatable)")
  p.add_argument("--masks", help="ROI masks (non-zero label = one ROI) replacing --windows")
  p.add_argument("--output", required=True, help="the folder to write into")
  p.add_argument("--windows", default=",".join(rois.WINDOWS),
                 help=f"comma-separated, from {', '.join(rois.WINDOWS)}")
  p.add_argument("--roi-size", "--roi_size", type=int, default=24)
  p.add_argument("--rois-per-image", "--rois_per_image", type=int, default=20)
  p.add_argument("--min-fraction", "--min_fraction", type=float, default=0.5,
                 help="least share of a box's reference pixels inside the window")
  p.add_argument("--bins", type=int, default=32, help="fixed bin number over the window")
  p.add_argument("--bin-width", "--bin_width", type=float, help="fixed bin size (HU) instead")
  p.add_argument("--mask-range", "--mask_range", default="-1000,1000",
                 help="HU range discretised for --masks ROIs")
  p.add_argument("--value-offset", "--value_offset", type=float, default=0.0,
                 help="non-DICOM files: HU = stored + offset (e.g. -1024)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-unpaired", "--skip_unpaired", action="store_true")
  p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
  p.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
  errors.add_debug_flag(p)
  errors.add_verbose_flag(p)
  args = p.parse_args(argv)
  names = [n for n, _ in args.compare]
  clash = {n for n in names if names.count(n) > 1 or n in (BASELINE, REFERENCE, MASK_WINDOW)}
  if clash:
    raise ValueError(f"--compare names must be unique and not {BASELINE!r}, {REFERENCE!r} "
                     f"or {MASK_WINDOW!r}: {sorted(clash)}")
  windows = [w.strip() for w in args.windows.split(",") if w.strip()]
  unknown = sorted(set(windows) - set(rois.WINDOWS))
  if unknown or not windows:
    raise ValueError(f"unknown --windows {unknown}; choose from {', '.join(rois.WINDOWS)}")
  try:
    mask_range = tuple(float(v) for v in args.mask_range.split(","))
  except ValueError:
    mask_range = ()
  if len(mask_range) != 2 or mask_range[0] >= mask_range[1]:
    raise ValueError(f"--mask-range takes LO,HI with LO < HI, got {args.mask_range!r}")
  sets = {BASELINE: args.images, **dict(args.compare), REFERENCE: args.reference}
  got = concordance_study(
      sets, args.output, masks=args.masks, windows=windows, roi_size=args.roi_size,
      rois_per_image=args.rois_per_image, min_fraction=args.min_fraction,
      bins=None if args.bin_width else args.bins, bin_width=args.bin_width,
      mask_range=mask_range, value_offset=args.value_offset, seed=args.seed,
      skip_unpaired=args.skip_unpaired, overwrite=args.overwrite,
      progress=not args.no_progress)
  print("\n".join(format_table(got["pooled"])))
  print(f"ROIs per window: {got['rois']}")
  print(f"Wrote features.csv, ccc.csv, ccc_table.md and ccc_bars.png to {got['output']}")
  return 0


def run() -> None:
  errors.command(main)  # one-paragraph errors (exit 2), SIGTERM message (exit 143)


if __name__ == "__main__":
  run()
