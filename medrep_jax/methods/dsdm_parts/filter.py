"""DSDM stage `filter`: the `ldm` automatic curation (realism + memorization, in place of
the paper's clinicians, Sec. V-A1) on image+mask pairs; each kept image keeps its mask."""
from __future__ import annotations

import numpy as np

from medrep_jax.methods.dsdm_parts import synthetic
from medrep_jax.methods.ldm_parts import filter_stage


class FilterStage(filter_stage.FilterStage):
  """Scores the `sample` stage's pairs; writes the accepted ones to WORKDIR/images."""

  def synthetic_source(self):
    k = max(2, int(self.info.num_mask_classes or self.info.num_classes))
    return synthetic.read(self.config.synthetic_dir, k, self.channels)

  def write_accepted(self, records: dict[str, np.ndarray], accepted: np.ndarray) -> None:
    synthetic.write(records["image"][accepted], records["mask"][accepted],
                    self.workdir / "images")

  def feature_net_path(self) -> str:
    return self.config.eval.feature_net_path or self.config.ref_encoder_from
