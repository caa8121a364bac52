"""DRFL stage `table`: the ablation ladder of Tables 5-7 from finished `train` runs.

Reads each run's done.json (its final eval on `train.eval_split`) and writes one row per
run: Dice, IoU and pixel accuracy in % (eq. 16-18) and GFLOPs per image, beside the
paper's LUNG numbers for the same rung (Tables 1, 5-7; mean over the paper's runs).
"""
from __future__ import annotations

import json
import pathlib

from medrep_jax.methods import base

# Dice / IoU / ACC (%) on LUNG: Table 1 (U-Net) and Tables 5-7 (the ladder).
PAPER_LUNG = {"unet": (90.6, 83.5, 95.3), "ss": (94.34, 89.69, 96.33),
              "ss_srs": (95.07, 91.77, 96.80), "dfm": (96.07, 91.77, 97.11),
              "dfm_rftm": (96.37, 92.77, 97.30), "dfm_rftm_cbam": (96.63, 93.75, 97.63),
              "drfl": (97.01, 94.82, 98.33)}
METRICS = ("dice", "iou", "pixel_accuracy", "gflops")


class LadderTable(base.Task):
  """`config.rows`: {variant: a finished train run's workdir ("stage:NAME" in a pipeline)}."""

  def run(self) -> base.Result:
    lines = ["## Ablation ladder (Tables 5-7)", "",
             "| variant | Dice | IoU | ACC | GFLOPs | paper LUNG Dice / IoU / ACC |",
             "|---|---|---|---|---|---|"]
    metrics = {}
    rows = dict(self.config.rows)  # a ConfigDict lists its keys sorted: back to ladder order
    order = [v for v in PAPER_LUNG if v in rows] + sorted(set(rows) - set(PAPER_LUNG))
    for variant in order:
      path = rows[variant]
      done = pathlib.Path(path) / "done.json"
      if not done.exists():
        raise FileNotFoundError(f"row {variant!r}: {done} not found; the run in {path} has "
                                f"not finished")
      final = json.loads(done.read_text())
      row = {k: float(final.get(f"eval/{k}", float("nan"))) for k in METRICS}
      metrics.update({f"{variant}/{k}": v for k, v in row.items()})
      paper = " / ".join(f"{v:.2f}" for v in PAPER_LUNG[variant]) if variant in PAPER_LUNG \
          else "-"
      lines.append(f"| {variant} | {100 * row['dice']:.2f} | {100 * row['iou']:.2f} | "
                   f"{100 * row['pixel_accuracy']:.2f} | {row['gflops']:.3g} | {paper} |")
    lines += ["", f"Evaluated on the `{self.config.eval_split}` split; GFLOPs are XLA's "
              f"count for one image's forward pass (a multiply-add counts 2). The paper's "
              f"steps are small against their std (Tables 5-7): read one seed's ladder "
              f"with care."]
    return base.Result(metrics, {}, lines)
