"""LTDiff++ end to end: ae (phase 1) -> latent_ddpm (phase 2) -> translate (A -> A').

  python -m medrep_jax.main --config configs/pipeline_ltdiff.py:size=small \
      --workdir runs/pipeline_ltdiff

Stages (configs/ltdiff.py builds each): `ae` trains the UNet++ on all slices of both
kernels; `latent_ddpm` freezes it (`ae_from="stage:ae"`), caches (Z_A, Z_B) and trains the
ε-model on Z_B conditioned on Z_A; `translate` (`ddpm_from="stage:latent_ddpm"`) noises
Z_A to `translate.t_star`, samples back conditioned on Z_A, decodes A' and writes
WORKDIR/translate/translated/{A,A_prime,B}/*.npy in HU, which
`python -m medrep_jax.radiomics --images .../A --reference .../B --compare ltdiff=.../A_prime`
reads. Override a stage's field with `--config.<stage>.<field>`, e.g.
`--config.translate.translate.t_star=250`.

Variant args: size=paper|small|tiny, data=covid_ct|phantoms, seed=<int>.
"""
import ml_collections as mlc

from medrep_jax import config_lib

ltdiff = config_lib.config_module("ltdiff")
DEFAULTS = dict(size="paper", data="covid_ct", seed=0)
CHOICES = dict(size=ltdiff.CHOICES["size"], data=ltdiff.CHOICES["data"])


def pipeline_stages(*, size: str = "paper", data: str = "covid_ct",
                    seed: int = 0) -> dict[str, mlc.ConfigDict]:
  """ae -> latent_ddpm -> translate, each later stage reading the earlier runs."""
  common = dict(size=size, data=data, seed=seed)
  stages = {s: ltdiff.ltdiff_config(stage=s, **common)
            for s in ("ae", "latent_ddpm", "translate")}
  stages["latent_ddpm"].ae_from = "stage:ae"
  stages["translate"].ae_from = "stage:ae"
  stages["translate"].ddpm_from = "stage:latent_ddpm"
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  stages = pipeline_stages(**config_lib.parse_variant(arg, DEFAULTS, CHOICES))
  return config_lib.pipeline(stages).lock()
