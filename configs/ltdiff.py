"""LTDiff++ (Sadia, Zhang, Chen): UNet++ encoder-decoder + latent DDPM for CT kernels.

  python -m medrep_jax.main --config configs/ltdiff.py:stage=ae,size=small --workdir runs/ltdiff_ae

Paper values (Sec. III-A/C, IV): UNet++ of depth 5, widths 32-64-128-256-512 (the UNet++
paper, which Sec. III-A1 follows) with deep-supervision heads on X_(0,1..4) (Sec.
III-A3); Adam, lr 1e-4 (Sec. III-C); the autoencoder trains 400 epochs on all slices of
both kernels (phase 1). Not stated, so choices here: the image size (512 px in the
paper's data; 256 here), the latent (the bottleneck X_(4,0) through a 1x1 conv to 4
channels: 16x16x4 at 256 px), the batch (16), the head weights (equal, 1/n), the
per-head loss (L1: the printed BCE + Dice is UNet++'s mask loss), and the HU window
[-1000, 1000] mapped to [0, 1] (it holds every evaluation window of Sec. IV-B).

Data: (A, B) kernel pairs simulated by FBP from real CT with the pilot of
shared/specs/ltdiff.md: 180 views, Poisson I0 = 5e4, A = Hann at 0.5 Nyquist (smooth,
non-standard), B = ramp (sharp, standard); cached once in `data.cache_dir` ("" = the shared
kernel-pair cache). Real pairs: `--config.data.kernels="('Br40', 'Bl64')"` with
`--config.data.root` holding `<kernel>/<patient>/...`.

Phase 2 (`stage=latent_ddpm`, needs `--config.ae_from=<ae run>`) and translation
(`stage=translate`, needs `--config.ddpm_from=<latent_ddpm run>`; `ae_from` "" = the one
the latent_ddpm run used); configs/pipeline_ltdiff.py runs ae -> latent_ddpm -> translate.
Adam, lr 1e-4 and 400 epochs for the DDPM ("same parameters and epochs", Sec. III-C). Not
stated, so choices here: T = 1000 with DDPM's linear β schedule, the denoiser
(DiffusionUNet "small" preset at base width 128 for 16x16 latents), EMA 0.9999, the
latent normalization (per-channel shift, 1/std scale), t* = 500 (the paper's σ² of
Z~_A = Z_A + η) and the sampler (DDPM ancestral, every step from t*).

Phase 3 (`stage=joint`, needs `--config.ddpm_from=<latent_ddpm run>`): the denoiser and
the UNet++ decoder fine-tuned together on ||Z_A' - Z_B||² + λ||D(Z_A') - B||², Z_A' the
one-step x̂_0 from Z_A noised to t < t* (`ltdiff_parts.joint`); `stage=translate` takes a
joint run as `ddpm_from`.

Baselines (Table I): `stage=direct` (UNet++ trained A -> B, L1; writes its translated
slices at the end), `stage=latent_ddpm,space=pixel` (the same conditional DDPM on the
images, translated by `stage=translate` like the latent one), and identity (A itself).
`stage=evaluate` (Sec. IV-B) reads the runs in `compare.ltdiff`, `compare.unetpp_direct`
and `compare.pixel_ddpm` and writes the CCC table per feature class.

Variant args:
  stage=ae|direct|latent_ddpm|joint|translate|evaluate  (phase 1; the UNet++ A -> B
        baseline; phase 2; phase 3; A -> A'; radiomic concordance)
  space=latent|pixel  (latent_ddpm only: pixel = the pixel_ddpm baseline)
  size=paper|small|tiny  (small: 128 px, a 4-level UNet++ at widths 16-128, latents
        16x16x4, a real-data run for a CPU; tiny: 32 px, widths 4-8-16, 2 steps, tests)
  data=covid_ct|phantoms  (covid_ct: the COVID-19-NY-SBU DICOMs, $MEDREP_DATA_DIR/
        ct_covid19_ny_sbu_dicom, 10 patients; phantoms: procedural phantoms read as HU,
        simulated on access, no data needed)
  seed=<int>
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

STAGES = ("ae", "direct", "latent_ddpm", "joint", "translate", "evaluate")
DEFAULTS = dict(stage="ae", size="paper", data="covid_ct", space="latent", seed=0)
CHOICES = dict(stage=STAGES, size=("paper", "small", "tiny"), data=("covid_ct", "phantoms"),
               space=("latent", "pixel"))

SIZES = {
    "paper": dict(image_size=256, widths=(32, 64, 128, 256, 512), latent_channels=4),
    "small": dict(image_size=128, widths=(16, 32, 64, 128), latent_channels=4),
    "tiny": dict(image_size=32, widths=(4, 8, 16), latent_channels=4),
}
# HU window (level, width): [-1000, 1000] -> [0, 1]; holds the windows of Sec. IV-B.
WINDOW = (0.0, 2000.0)


def data_config(data: str = "covid_ct", size: str = "paper") -> mlc.ConfigDict:
  """The data fields: the preset's (root resolution, splits by patient) plus the kernel
  pairs' (`ltdiff_parts.data.pair_source`)."""
  c = registry.data_config(data, image_size=SIZES[size]["image_size"],
                           window_level=WINDOW[0], window_width=WINDOW[1])
  c.kernels = ()  # () simulates the pairs; (A, B): real kernel folders under root
  c.max_slices = 16 if size == "tiny" else 0  # > 0: this many slices, spread over patients
  c.include = ""  # regex on slice paths, e.g. "/axial/" ("" = every slice, reformats too)
  c.group_depth = 1  # folders below the root that name the patient (split by patient)
  c.value_offset = 0.0  # real pairs stored as non-HU arrays: HU = value + offset
  c.cache_dir = ""  # "" = $MEDREP_CACHE_DIR/kernel_pairs, else ~/.cache/medrep_jax/...
  if data == "phantoms" and size == "tiny":
    c.num_examples = 16
  # The spec's pilot (shared/specs/ltdiff.md): the paper's baseline regime.
  c.simulation = mlc.ConfigDict(dict(num_views=180, i0=5e4, filter_a="hann", cutoff_a=0.5,
                                     filter_b="ramp", cutoff_b=1.0, fov_mm=400.0,
                                     mu_water=0.0192, seed=0))
  return c


def _stage_config(stage: str, size: str, data: str, seed: int) -> mlc.ConfigDict:
  """The base config of one stage: its name, seed and the kernel-pair data fields."""
  c = config_lib.base_config("ltdiff")
  c.stage = stage
  c.seed = seed
  c.data = data_config(data, size)
  return c


def _adam_schedule(c: mlc.ConfigDict, num_epochs: float) -> None:
  """Adam, lr 1e-4, constant (Sec. III-C: every phase), batch 16, `num_epochs` epochs."""
  c.optim.update(dict(name="adam", lr=1e-4, weight_decay=0.0, schedule="constant"))
  c.train.update(dict(batch_size=16, num_epochs=num_epochs, eval_every=0, log_every=20,
                      checkpoint_every=1000, eval_batch_size=16))


def ae_config(*, size: str = "paper", data: str = "covid_ct", seed: int = 0,
              stage: str = "ae") -> mlc.ConfigDict:
  """Phase 1: the UNet++ reconstructs every slice of both kernels (Sec. III-A, III-C).

  `stage="direct"`: the `unetpp_direct` baseline, the same network, loss and schedule
  trained A -> B on the pairs (half the examples of `ae`: one per pair, not two)."""
  s = SIZES[size]
  c = _stage_config(stage, size, data, seed)
  c.model = mlc.ConfigDict(dict(
      widths=s["widths"], norm="batch", deep_supervision=True,
      latent_channels=s["latent_channels"],  # 0: the bottleneck X_(d-1,0) itself
      skip_mode="source",  # "none": decode from the latent alone (the skip ablation)
      upsample="bilinear"))
  # Sec. III-A3: L = sum_j w_j l(head_j); l1 | l2 per head, () = equal weights 1/n.
  # kind="bce_dice" (the printed mask loss; heads become logits, images their sigmoid)
  # needs allow_bce_dice=True: it is UNet++'s segmentation loss, not a CT reconstruction loss.
  c.loss = mlc.ConfigDict(dict(kind="l1", head_weights=(), allow_bce_dice=False))
  c.eval = mlc.ConfigDict(dict(figure_slices=6))  # slices in the report's figure
  if stage == "direct":  # > 0: translate that many eval pairs at the end (spread as
    c.eval.translate_slices = 0  # translate.max_slices spreads them), 0 = all
  _adam_schedule(c, num_epochs=400.0)
  if size == "small":
    # 50 train pairs of covid_ct (100 slices of both kernels) at 128 px: 1000 steps of
    # batch 8 ≈ 80 epochs, ~30 min on 2 CPU cores.
    c.train.update(dict(num_epochs=0.0, num_steps=1000, batch_size=8, eval_every=500,
                        checkpoint_every=500, log_every=25))
  elif size == "tiny":
    config_lib.set_tiny_train(c)
    c.eval.figure_slices = 4
    if stage == "direct":
      c.eval.translate_slices = 8  # as translate.max_slices
  return c


def direct_config(*, size: str = "paper", data: str = "covid_ct",
                  seed: int = 0) -> mlc.ConfigDict:
  """The `unetpp_direct` baseline of Table I: UNet++ trained A -> B with L1 per head."""
  return ae_config(size=size, data=data, seed=seed, stage="direct")


# The denoiser (DiffusionUNet presets + overrides; 0 / () keep the preset's value), on
# latents (16x16x4 at paper and small sizes) and, for the pixel_ddpm baseline, on images.
_KEEP = dict(channel_mult=(), num_res_blocks=0, attention_resolutions=())
DENOISERS = {
    "latent": {
        "paper": dict(_KEEP, size="small", base_width=128),
        "small": dict(_KEEP, size="small", base_width=32),
        "tiny": dict(_KEEP, size="tiny", base_width=8, channel_mult=(1, 2),
                     num_res_blocks=1)},
    "pixel": {  # 256 / 128 / 32 px images: deeper, attention only at 16x16 / 8x8
        "paper": dict(_KEEP, size="small", base_width=64, channel_mult=(1, 1, 2, 2, 4),
                      attention_resolutions=(16,)),
        "small": dict(_KEEP, size="small", base_width=32, channel_mult=(1, 2, 2, 2),
                      num_res_blocks=1, attention_resolutions=(8,)),
        "tiny": dict(_KEEP, size="tiny", base_width=8, channel_mult=(1, 2),
                     num_res_blocks=1)},
}


def latent_ddpm_config(*, size: str = "paper", data: str = "covid_ct", seed: int = 0,
                       space: str = "latent") -> mlc.ConfigDict:
  """Phase 2: ε-model on Z_B conditioned on Z_A (concatenation), ae frozen (Sec. III-B/C).

  `space="pixel"`: the `pixel_ddpm` baseline, the same conditional DDPM on the images
  (B given A), no autoencoder (`ae_from` is not read)."""
  c = _stage_config("latent_ddpm", size, data, seed)
  c.space = space
  c.ae_from = ""  # a finished ae run; "stage:ae" in the pipeline
  c.model = mlc.ConfigDict(DENOISERS[space][size])
  # Not stated in the paper: DDPM's T and linear schedule.
  c.diffusion = mlc.ConfigDict(dict(schedule="linear", num_timesteps=1000,
                                    parameterization="eps"))
  c.latent_norm = True  # z' = (z - per-channel mean) / std of the first batch
  c.ema_decay = 0.9999
  _adam_schedule(c, num_epochs=400.0)
  if size == "small":  # 50 train pairs: 2000 steps of 16 ≈ 640 epochs, ~12 min
    c.ema_decay = 0.999
    c.train.update(dict(num_epochs=0.0, num_steps=2000, eval_every=500,
                        checkpoint_every=500, log_every=25))
  elif size == "tiny":
    c.diffusion.num_timesteps = 50
    c.ema_decay = 0.9
    config_lib.set_tiny_train(c)
  return c


def joint_config(*, size: str = "paper", data: str = "covid_ct",
                 seed: int = 0) -> mlc.ConfigDict:
  """Phase 3 (Sec. III-C): ε_θ and the decoder fine-tuned on ||Z_A' - Z_B||² + λ||D(Z_A') - B||²."""
  c = _stage_config("joint", size, data, seed)
  c.ddpm_from = ""  # a finished latent_ddpm run; "stage:latent_ddpm" in the pipeline
  c.ae_from = ""  # "" = the ae run the latent_ddpm run was trained on
  # Not stated: λ, and t* (the translation's; Z_A' is the one-step x̂_0 from t < t*).
  # Latents are normalized to unit std and images are in [0, 1] (a 20 HU error is an MSE of
  # 1e-4): λ = 100 puts the image term on the latent term's scale.
  c.joint = mlc.ConfigDict(dict(lam=100.0, t_star=500))
  c.ema_decay = 0.999
  _adam_schedule(c, num_epochs=50.0)
  if size == "small":
    c.train.update(dict(num_epochs=0.0, num_steps=300, batch_size=8, eval_every=150,
                        checkpoint_every=150, log_every=25))
  elif size == "tiny":
    c.joint.t_star = 25
    c.ema_decay = 0.9
    config_lib.set_tiny_train(c)
  return c


def translate_config(*, size: str = "paper", data: str = "covid_ct",
                     seed: int = 0) -> mlc.ConfigDict:
  """A -> A': Z_A noised to t*, reverse chain conditioned on Z_A, decoded (SDEdit reading)."""
  c = _stage_config("translate", size, data, seed)
  c.ae_from = ""  # "" = the ae run the latent_ddpm run was trained on
  c.ddpm_from = ""  # a finished latent_ddpm run; "stage:latent_ddpm" in the pipeline
  # t_star in [1, T]; sampler ddpm (every step from t*) | ddim (`steps`, `eta`).
  c.translate = mlc.ConfigDict(dict(t_star=500, sampler="ddpm", steps=50, eta=0.0,
                                    batch_size=16, max_slices=0, figure_slices=4,
                                    seed=seed))
  if size == "small":
    c.translate.update(dict(sampler="ddim", steps=50))
  elif size == "tiny":
    config_lib.set_tiny_train(c)  # trains nothing; keeps the tiny contract
    c.translate.update(dict(t_star=25, sampler="ddim", steps=4, batch_size=8,
                            max_slices=8))
  return c


def evaluate_config(*, size: str = "paper", data: str = "covid_ct",
                    seed: int = 0) -> mlc.ConfigDict:
  """Sec. IV-B: Lin's CCC per radiomic feature class of each translator's A' against B."""
  c = _stage_config("evaluate", size, data, seed)
  # Table I's rows: a finished translate (ltdiff, pixel_ddpm) or direct run each; "" = none.
  c.compare = mlc.ConfigDict(dict(ltdiff="", unetpp_direct="", pixel_ddpm=""))
  c.evaluate = mlc.ConfigDict(dict(
      windows=("lung", "soft", "soft_narrow", "bone", "whole"),  # Sec. IV-B + whole slice
      roi_size=24, rois_per_image=20, min_fraction=0.5,
      bins=32, bin_width=0.0,  # fixed bin number over each window (bin_width > 0: HU bins)
      seed=seed))
  if size == "tiny":
    config_lib.set_tiny_train(c)  # trains nothing; keeps the tiny contract
    c.evaluate.update(dict(roi_size=8, rois_per_image=4, bins=8))
  return c


def ltdiff_config(*, stage: str = "ae", size: str = "paper", data: str = "covid_ct",
                  space: str = "latent", seed: int = 0) -> mlc.ConfigDict:
  """A complete, unlocked config of one stage (`space` is the latent_ddpm stage's)."""
  if stage == "latent_ddpm":
    return latent_ddpm_config(size=size, data=data, seed=seed, space=space)
  if space != "latent":
    raise config_lib.ConfigError(f"space={space!r} is a variant of stage=latent_ddpm only")
  builders = {"ae": ae_config, "direct": direct_config, "joint": joint_config,
              "translate": translate_config, "evaluate": evaluate_config}
  return builders[stage](size=size, data=data, seed=seed)


def get_config(arg: str = "") -> mlc.ConfigDict:
  return ltdiff_config(**config_lib.parse_variant(arg, DEFAULTS, CHOICES)).lock()
