"""DSDM stage `table`: Table 1/2-, Table 5- and Fig. 6-shaped tables from finished runs.

`table.generation` maps a row name to a `generator` run (FD, KID and diversity of its final
eval; a run that also scored other guidance scales, `eval.extra_guidance_scales`, adds a
row "<row> s=X" for each), `table.segmentation` a row to a `seg` run
(Table 5: fusion none / skip / caa), `table.synthetic` a synthetic fraction to a `seg` run
(Fig. 6). Each row sits beside the paper's number for the same row (its DCI data, not
this data: compare directions, not values).
"""
from __future__ import annotations

import json
import pathlib

from medrep_jax.methods import base

# Table 1 (FID / LPIPS), Table 2's guidance rows, Table 5 and Fig. 6 (Dice / mIoU).
PAPER_GENERATION = {"uncond": (31.92, 0.436), "mask": (26.25, 0.386),
                    "reference": (29.84, 0.395), "mask_reference": (21.36, 0.354),
                    "mask_reference_s0": (28.35, 0.412),
                    "mask_reference_no_color_norm": (23.92, 0.365)}
PAPER_SEGMENTATION = {"none": (0.7067, 0.5620), "skip": (0.8085, 0.6849),
                      "caa": (0.8302, 0.7131)}
PAPER_SYNTHETIC = {"f50": (0.8367, 0.7202)}  # rows f<percent of the pool>


def final_metrics(path: str | pathlib.Path, row: str) -> dict[str, float]:
  done = pathlib.Path(path) / "done.json"
  if not done.exists():
    raise FileNotFoundError(f"row {row!r}: {done} not found; the run in {path} has not "
                            f"finished")
  return json.loads(done.read_text())


def _paper(table: dict, row: str, fmt: str) -> str:
  return " / ".join(format(v, fmt) for v in table[row]) if row in table else "-"


class TableStage(base.Task):
  """Writes the tables of whatever rows `config.table` names (empty sections skipped)."""

  def run(self) -> base.Result:
    t = self.config.table
    metrics, lines = {}, []
    gen = {k: v for k, v in dict(t.generation).items() if v}
    if gen:
      lines += ["## Generation (Tables 1-2)", "",
                "| row | FD [95% CI] | KID | diversity | LPIPS diversity | paper FID / LPIPS |",
                "|---|---|---|---|---|---|"]
      for row in sorted(gen, key=lambda r: (r not in PAPER_GENERATION, r)):
        m = final_metrics(gen[row], row)
        scales = sorted({k.split("@s")[1] for k in m if k.startswith("eval/fd@s")})
        for name, suffix in [(row, "")] + [(f"{row} s={x}", f"@s{x}") for x in scales]:
          get = lambda k: float(m.get(f"eval/{k}{suffix}", float("nan")))
          fd, lo, hi, kid, div, lp = (get(k) for k in ("fd", "fd_lo", "fd_hi", "kid",
                                                       "diversity", "lpips_diversity"))
          metrics.update({f"{name}/fd": fd, f"{name}/kid": kid, f"{name}/diversity": div})
          paper = _paper(PAPER_GENERATION, row if not suffix else f"{row}_s0"
                         if suffix == "@s0" else "", ".3g")
          lines.append(f"| {name} | {fd:.4g} [{lo:.4g}, {hi:.4g}] | {kid:.3g} | {div:.3g} | "
                       f"{'-' if lp != lp else f'{lp:.3g}'} | {paper} |")
      lines += ["", "FD/KID in the reference encoder's feature space (not Inception); "
                "diversity: mean pairwise feature distance of the samples of one mask (LPIPS "
                "diversity only with user-supplied weights, `eval.lpips_weights`). The paper's direction: uncond > reference > mask > "
                "mask_reference, and guidance lowers FD.", ""]
    sections = (("Segmentation (Table 5)", t.segmentation, PAPER_SEGMENTATION),
                ("Synthetic fraction (Fig. 6)", t.synthetic, PAPER_SYNTHETIC))
    for title, given, paper in sections:
      rows = {k: v for k, v in dict(given).items() if v}
      if not rows:
        continue
      lines += [f"## {title}", "",
                "| row | mDice | mIoU | precision | recall | accuracy | paper Dice / mIoU |",
                "|---|---|---|---|---|---|---|"]
      for row in sorted(rows, key=lambda r: (len(r), r)):
        m = final_metrics(rows[row], row)
        vals = [m.get(f"eval/{k}", float("nan")) for k in
                ("mean_dice", "mean_iou", "mean_precision", "mean_recall", "accuracy")]
        metrics.update({f"{row}/mean_dice": vals[0], f"{row}/mean_iou": vals[1]})
        lines.append(f"| {row} | " + " | ".join(f"{v:.4f}" for v in vals) +
                     f" | {_paper(paper, row, '.4f')} |")
      lines.append("")
    if not lines:
      raise ValueError("table: no rows; set table.generation, table.segmentation or "
                       "table.synthetic to {row: finished run}")
    return base.Result(metrics, {}, lines)
