"""DSDM / DiffusionDCI end to end: generator, synthetic data, segmentation, probe.

  python -m medrep_jax.main --config configs/pipeline_dsdm.py:size=small \
      --workdir runs/pipeline_dsdm

Stages (configs/dsdm.py builds each), run in this order in WORKDIR/<stage>/:
  ref_encoder  SimCLR ResNet-18 on the train images (the reference encoder);
  generator    the DSDM (`variant`, `guidance_scale`), FD/KID and diversity on test masks;
  sample       K images per train mask with another train image as reference;
  filter       automatic curation of the pairs (in place of the paper's clinicians);
  seg          segmentation from the DSDM's features (`fusion`), trained on the real
               images plus `synthetic_fraction` of the filtered pool (Fig. 6: 0.5 best);
  probe        the block x timestep pixel probe (Fig. 3);
  table        the generator's and the segmenter's rows of Tables 1/2 and 5.

Override a stage's field with `--config.<stage>.<field>`, e.g.
`--config.seg.t_feat=400`.

Variant args: as configs/dsdm.py (variant, guidance_scale, color_norm, fusion,
synthetic_fraction, size, data, seed); stage is fixed by the pipeline.
"""
import ml_collections as mlc

from medrep_jax import config_lib

dsdm = config_lib.config_module("dsdm")
DEFAULTS = {**{k: v for k, v in dsdm.DEFAULTS.items() if k != "stage"},
            "synthetic_fraction": 0.5}
CHOICES = {k: v for k, v in dsdm.CHOICES.items() if k != "stage"}


def pipeline_stages(**kw) -> dict[str, mlc.ConfigDict]:
  """ref_encoder -> generator -> sample -> filter -> seg -> probe."""
  stages = {s: dsdm.BUILDERS[s](**kw) for s in dsdm.STAGES}
  stages["generator"].ref_encoder_from = "stage:ref_encoder"
  for s in ("sample", "seg", "probe"):
    stages[s].generator_from = "stage:generator"
  stages["filter"].synthetic_dir = "stage:sample/images"
  stages["filter"].ref_encoder_from = "stage:ref_encoder"
  stages["seg"].synthetic_dir = "stage:filter/images"
  table = stages["table"].table
  table.generation[kw.get("variant", "mask_reference")] = "stage:generator"
  table.segmentation[kw.get("fusion", "caa")] = "stage:seg"
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  stages = pipeline_stages(**config_lib.parse_variant(arg, DEFAULTS, CHOICES))
  return config_lib.pipeline(stages).lock()
