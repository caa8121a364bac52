"""LTDiff++ baseline `unetpp_direct` (stage `direct`): the same UNet++ trained A -> B.

The paper's Table I compares LTDiff++ with a UNet++ that maps the non-standard kernel A to
the standard kernel B directly. Here it is the `ae` stage's network and loss with another
target: every head regresses B from A (L = sum_j w_j * l1(head_j(A), B), Sec. III-A3 with
the `ae` stage's `loss` fields), Adam 1e-4, one jit, batch sharded on "data".

Evaluation, on `train.eval_split`: L1 / PSNR / L1 in HU of the deepest head against B
(per head too). At the end the split (`eval.translate_slices` > 0: that many pairs, spread over it as
`translate.max_slices` spreads them) is translated, A' = clip(UNet++(A), 0, 1), and written
as the `translate` stage writes it (WORKDIR/translated/{A,A_prime,B}/*.npy in HU), so the
`evaluate` stage and `python -m medrep_jax.radiomics` read both the same way.
"""
from __future__ import annotations

import jax

from medrep_jax.methods import base
from medrep_jax.methods.ltdiff_parts import ae
from medrep_jax.methods.ltdiff_parts import data as data_lib
from medrep_jax.methods.ltdiff_parts import translate


class DirectStage(ae.AEStage):
  """UNet++ regression A -> B (the `unetpp_direct` baseline); writes translated/ at the end."""

  def make_source(self, split: str):
    pairs = data_lib.pair_source(self.config.data, split,
                                 progress=bool(self.config.train.progress))
    return data_lib.AToB(pairs, self.info)

  @staticmethod
  def target(batch):
    return batch["target"]

  def evaluate(self, outputs, state, ctx):
    metrics = self.scores(outputs)
    if not ctx.final:
      return base.Result(metrics)
    c = self.config
    variables = jax.device_get(state.variables())
    predict = jax.jit(self.reconstruct)
    names, images = translate.translate_split(
        c.data, ctx.split, lambda i, a: predict(variables, a),
        batch_size=int(c.train.eval_batch_size), num_devices=1,
        max_slices=int(c.eval.translate_slices), progress=bool(c.train.progress))
    root = translate.write_translated(ctx.workdir, names, images, c.data)
    metrics.update({f"translate/{k}": v
                    for k, v in translate.translation_metrics(images, c.data).items()})
    fig = translate.translation_figure(images, int(c.eval.figure_slices), ctx.workdir)
    lines = [f"UNet++ trained A -> B (the `unetpp_direct` baseline); metrics of the deepest "
             f"head against B on the {ctx.split} split ({len(names)} slices). A' = the "
             f"network's output, written in HU to `{root}` (A/, A_prime/, B/).", "",
             *translate.translation_table(translate.translation_metrics(images, c.data))]
    return base.Result(metrics, {"A / A' / B / |A-B| / |A'-B| (center crops)": fig}, lines)
