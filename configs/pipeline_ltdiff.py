"""LTDiff++ end to end, with the Table I baselines and the radiomic evaluation.

  python -m medrep_jax.main --config configs/pipeline_ltdiff.py:size=small \
      --workdir runs/pipeline_ltdiff

Stages (configs/ltdiff.py builds each), run in this order in WORKDIR/<stage>/:
  ae           phase 1: the UNet++ on all slices of both kernels;
  latent_ddpm  phase 2: the ae frozen (`ae_from="stage:ae"`), (Z_A, Z_B) cached, the
               ε-model on Z_B conditioned on Z_A;
  translate    Z_A noised to `translate.t_star`, sampled back conditioned on Z_A, decoded:
               WORKDIR/translate/translated/{A,A_prime,B}/*.npy in HU;
  direct       the `unetpp_direct` baseline (UNet++ trained A -> B), its translated/ too;
  pixel_ddpm, translate_pixel   (with `pixel=True`) the `pixel_ddpm` baseline: the same
               conditional DDPM on the images, translated the same way;
  joint, translate_joint   (with `joint=True`) phase 3: the denoiser and decoder
               fine-tuned together, translated (row `ltdiff_joint`);
  evaluate     Lin's CCC per radiomic feature class of each A' against B in the HU
               windows of Sec. IV-B: WORKDIR/evaluate/ccc/ccc_table.md (Table I's form).

Override a stage's field with `--config.<stage>.<field>`, e.g.
`--config.translate.translate.t_star=250`.

Variant args: size=paper|small|tiny, data=covid_ct|phantoms, pixel=False|True,
joint=False|True, seed=<int>.
"""
import ml_collections as mlc

from medrep_jax import config_lib

ltdiff = config_lib.config_module("ltdiff")
DEFAULTS = dict(size="paper", data="covid_ct", pixel=False, joint=False, seed=0)
CHOICES = dict(size=ltdiff.CHOICES["size"], data=ltdiff.CHOICES["data"])


def pipeline_stages(*, size: str = "paper", data: str = "covid_ct", pixel: bool = False,
                    joint: bool = False, seed: int = 0) -> dict[str, mlc.ConfigDict]:
  """ae -> latent_ddpm -> translate -> direct [-> pixel_ddpm -> translate_pixel]
  [-> joint -> translate_joint] -> evaluate."""
  common = dict(size=size, data=data, seed=seed)
  stages = {s: ltdiff.ltdiff_config(stage=s, **common)
            for s in ("ae", "latent_ddpm", "translate", "direct")}
  stages["latent_ddpm"].ae_from = "stage:ae"
  stages["translate"].ae_from = "stage:ae"
  stages["translate"].ddpm_from = "stage:latent_ddpm"
  evaluate = ltdiff.ltdiff_config(stage="evaluate", **common)
  evaluate.compare.update(dict(ltdiff="stage:translate", unetpp_direct="stage:direct"))
  if pixel:
    stages["pixel_ddpm"] = ltdiff.ltdiff_config(stage="latent_ddpm", space="pixel", **common)
    stages["translate_pixel"] = ltdiff.ltdiff_config(stage="translate", **common)
    stages["translate_pixel"].ddpm_from = "stage:pixel_ddpm"
    evaluate.compare.pixel_ddpm = "stage:translate_pixel"
  if joint:
    stages["joint"] = ltdiff.ltdiff_config(stage="joint", **common)
    stages["joint"].ddpm_from = "stage:latent_ddpm"
    stages["translate_joint"] = ltdiff.ltdiff_config(stage="translate", **common)
    stages["translate_joint"].ddpm_from = "stage:joint"
    evaluate.compare.ltdiff_joint = "stage:translate_joint"
  stages["evaluate"] = evaluate
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  stages = pipeline_stages(**config_lib.parse_variant(arg, DEFAULTS, CHOICES))
  return config_lib.pipeline(stages).lock()
