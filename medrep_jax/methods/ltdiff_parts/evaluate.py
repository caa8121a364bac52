"""LTDiff++ stage `evaluate` (Sec. IV-B): radiomic concordance of A' with B, per class.

Reads the slices that the translating stages wrote (`translate` for LTDiff++ and
`pixel_ddpm`, `direct` for `unetpp_direct`): RUN/translated/{A,A_prime,B}/*.npy in HU.
`compare.<row>` names each run ("" leaves the row out); rows, in Table I's order:

  identity        A itself (the baseline row; no run: A/ of the first run)
  unetpp_direct   `compare.unetpp_direct`, a `direct` run
  pixel_ddpm      `compare.pixel_ddpm`, a `translate` run of a pixel-space DDPM
  ltdiff          `compare.ltdiff`, a `translate` run of the latent DDPM (+ skip ablations
                  under any other name: `compare` takes extra keys)

The slices every run holds (by file name; `translate.max_slices` may keep fewer) are
compared, and their B must agree across runs (one reference for all rows). The study (`eval.radiomics.study.concordance_study`) samples the same ROIs
in every set inside the HU windows of Sec. IV-B and on the whole slice, extracts every
feature and computes Lin's CCC(set, B) per feature across ROIs; a class's cell is the
mean ± std over its features (Table I's form). Writes WORKDIR/ccc/ (features.csv,
ccc.csv, ccc_table.md, ccc_bars.png) and a figure of A / A' / B / |A' - B| crops in each
window (figures/windows.png).

Metrics: `ccc/<row>/<class>` (the mean over all windows' features) for every row.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from medrep_jax.config_lib import ConfigError
from medrep_jax.data.sources import DataError
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval.radiomics import CLASSES, rois, study
from medrep_jax.methods import base
from medrep_jax.methods.ltdiff_parts import translate

IDENTITY = "identity"
ROWS = {IDENTITY: "baseline (A)", "unetpp_direct": "UNet++ direct",
        "pixel_ddpm": "pixel DDPM", "ltdiff": "LTDiff++"}


def translated_dir(run_dir: str, key: str) -> pathlib.Path:
  """RUN/translated, checked to hold A/, A_prime/ and B/ (else an error naming the run)."""
  root = pathlib.Path(run_dir).expanduser() / "translated"
  missing = [f for f in translate.FOLDERS if not (root / f).is_dir()]
  if missing:
    raise DataError(f"compare.{key}={run_dir!r}: {root} lacks {missing}; point it at a "
                    f"finished ltdiff `translate` or `direct` run")
  return root


def same_slices(roots: dict[str, pathlib.Path]) -> tuple[list[str], dict[str, int]]:
  """(the slice names every run holds, {run: its slice count}); refuses runs that share no
  slice, or whose B of a shared slice differs (the rows must share one reference)."""
  names = {k: {p.stem for p in (r / "B").glob("*.npy")} for k, r in roots.items()}
  shared = sorted(set.intersection(*names.values()))
  first = next(iter(roots))
  if not shared:
    held = ", ".join(f"compare.{k}: {len(n)} slices" for k, n in names.items())
    raise DataError(f"the runs share no slice ({held}): every row must translate the same split (the same data and "
                    f"train.eval_split)")
  for k, root in roots.items():
    for name in shared:
      b, b0 = np.load(root / "B" / f"{name}.npy"), np.load(roots[first] / "B" / f"{name}.npy")
      if b.shape != b0.shape or not np.allclose(b, b0, atol=1e-3):
        raise DataError(f"B/{name}.npy differs between compare.{k} and compare.{first}: "
                        f"the rows must share one reference (the same data config)")
  return shared, {k: len(n) for k, n in names.items()}


def window_figure(roots: dict[str, pathlib.Path], names: list[str], windows, path, *,
                  size: int, seed: int) -> str | None:
  """Rows per window: A, every A', B, every |A' - B|, on one ROI-centred crop each,
  displayed over the window's HU range (differences over [0, window width])."""
  first = roots[next(iter(roots))]
  rng = np.random.default_rng(seed)
  cells, titles, ranges = [], [], []
  for w in windows:
    lo, hi = rois.RANGES[w]
    for name in names:
      b = np.load(first / "B" / f"{name}.npy")
      crop = min(b.shape[0], b.shape[1], 2 * size)
      try:
        roi = rois.sample_rois(b, window=w, size=size, count=1, rng=rng)[0]
      except rois.NoRoiError:
        continue
      r = int(np.clip(roi.row + size // 2 - crop // 2, 0, b.shape[0] - crop))
      c = int(np.clip(roi.col + size // 2 - crop // 2, 0, b.shape[1] - crop))
      cut = lambda x: x[r:r + crop, c:c + crop]
      primes = {k: cut(np.load(root / "A_prime" / f"{name}.npy")) for k, root in roots.items()}
      row = [("A", cut(np.load(first / "A" / f"{name}.npy")), (lo, hi))]
      row += [(f"{k}", x, (lo, hi)) for k, x in primes.items()]
      row += [("B", cut(b), (lo, hi))]
      row += [(f"|{k}-B|", np.abs(x - cut(b)), (0.0, hi - lo)) for k, x in primes.items()]
      for title, x, vr in row:
        cells.append(x)
        titles.append(f"{w}: {title}" if title == "A" else title)
        ranges.append(vr)
      break
  if not cells:
    return None
  ncol = 2 + 2 * len(roots)
  return fig_lib.image_grid(np.stack(cells), path, nrow=ncol, titles=titles,
                            value_ranges=ranges)


class EvaluateStage(base.Task):
  """Table I of LTDiff++: CCC per feature class of every translator's A' against B."""

  def run(self) -> base.Result:
    c, ec = self.config, self.config.evaluate
    given = {k: str(v) for k, v in c.compare.items() if str(v)}
    if not given:
      raise ConfigError("compare lists no run: set compare.ltdiff (and compare."
                        "unetpp_direct / compare.pixel_ddpm) to finished translate / direct "
                        "runs")
    if IDENTITY in given:
      raise ConfigError("compare.identity is A itself and takes no run; leave it out")
    order = [k for k in ROWS if k in given] + sorted(k for k in given if k not in ROWS)
    roots = {k: translated_dir(given[k], k) for k in order}
    names, counts = same_slices(roots)
    first = roots[order[0]]
    sets = {IDENTITY: str(first / "A"), **{k: str(roots[k] / "A_prime") for k in order},
            study.REFERENCE: str(first / "B")}
    windows = tuple(str(w) for w in ec.windows)
    unknown = sorted(set(windows) - set(rois.WINDOWS))
    if unknown or not windows:
      raise ConfigError(f"evaluate.windows: unknown {unknown}; choose from {rois.WINDOWS}")
    got = study.concordance_study(
        sets, self.workdir / "ccc", windows=windows, roi_size=int(ec.roi_size),
        rois_per_image=int(ec.rois_per_image), min_fraction=float(ec.min_fraction),
        bins=int(ec.bins) or None, bin_width=float(ec.bin_width) or None,
        seed=int(ec.seed), skip_unpaired=True, overwrite=True,
        progress=bool(c.train.progress))
    pooled = got["pooled"]
    metrics = {f"ccc/{k}/{cls}": float(pooled[k][cls][0]) for k in pooled for cls in CLASSES}
    metrics["num_slices"] = len(names)
    metrics.update({f"rois/{w}": int(n) for w, n in got["rois"].items()})
    labelled = {ROWS.get(k, k): v for k, v in pooled.items()}
    figs = {"CCC per feature class (mean ± std over the class's features)":
            os.path.relpath(self.workdir / "ccc" / "ccc_bars.png", self.workdir)}
    path = window_figure(roots, names, [w for w in windows if w != "whole"],
                         self.workdir / "figures" / "windows.png",
                         size=int(ec.roi_size), seed=int(ec.seed))
    if path:
      figs["A / A' / B / |A'-B| in each HU window (display range: the window)"] = (
          os.path.relpath(path, self.workdir))
    lines = [
        f"Lin's CCC of each radiomic feature across ROIs, against B, on {len(names)} "
        f"slices; ROIs per window: {got['rois']}. Cells: mean ± std over the class's "
        f"features, all windows together (Table I's form). Per-window tables: "
        f"`ccc/ccc_table.md`; every feature: `ccc/ccc.csv`.", "",
        *study.format_table(labelled), "",
        "Runs: " + ", ".join(f"{ROWS.get(k, k)} = `{given[k]}` ({counts[k]} slices)"
                             for k in order) + f"; the {len(names)} slices all of them hold "
        "are compared."]
    return base.Result(metrics, figs, lines)
