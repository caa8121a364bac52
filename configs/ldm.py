"""LDM: KL-VAE + latent ε-prediction UNet for synthetic images (dual-stream paper, Stage 1).

  python -m medrep_jax.main --config configs/ldm.py:data=kermany,size=small --workdir runs/ldm

Paper values (Section IV-A-1, Stage 1): 256×256 images → 64×64 latents (f = 4); VAE with
Adam, lr 1e-6, batch 4, 1000 epochs; latent UNet with AdamW, lr 1e-4, 1000 epochs; 1000
diffusion steps when generating.

Variant args:
  stage=all|vae|unet|sample|filter  (all: the four-stage pipeline; a single stage needs
        --config.vae_from=<vae run> and, for sample, --config.unet_from=<unet run>)
  size=paper|small|tiny  (small: 64 px, a CPU-feasible real-data run; tiny: 2 steps a stage)
  data=<dataset> (kermany: grey chest X-ray; kvasir_seg: RGB; covid19_radiography /
        kvasir_seg_tfds / isic2018: manual-download TFDS sets)
  seed=<int>
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

STAGES = ("vae", "unet", "sample", "filter")
DEFAULTS = dict(stage="all", size="paper", data="kermany", seed=0)
CHOICES = dict(stage=("all", *STAGES), size=("paper", "small", "tiny"), data=registry.PRESETS)


def stage_config(stage: str, *, data: str = "kermany", size: str = "paper",
                 seed: int = 0) -> mlc.ConfigDict:
  """One LDM stage's full config (every stage carries every field, so overrides work)."""
  c = config_lib.base_config("ldm")
  # unet stage: encode at most this many train images to latents (0: the whole split).
  c.train.max_train_examples = 0
  c.stage = stage
  c.seed = seed
  c.data = registry.data_config(data)
  c.data.image_size = {"paper": 256, "small": 64, "tiny": 16}[size]
  c.vae_from = ""
  c.unet_from = ""
  c.synthetic_dir = ""
  c.ema_decay = 0.9999
  c.latent_shift = True  # centre latents per channel (False: LDM's scale factor only)
  c.model = mlc.ConfigDict()
  c.model.size = "paper"  # vae_config / diffusion_unet_config preset
  c.model.base_width = 0  # > 0 overrides the preset's base width
  c.model.num_res_blocks = 0  # > 0 overrides the preset's res blocks per level
  c.model.kl_weight = 1e-6
  c.model.rec_loss = "l1"
  c.model.disc_weight = 0.0  # > 0 adds the PatchGAN hinge loss after disc_start steps
  c.model.disc_start = 5000
  c.model.disc_width = 64
  c.diffusion = mlc.ConfigDict(dict(schedule="linear", num_timesteps=1000,
                                    parameterization="eps"))
  c.eval = mlc.ConfigDict(dict(feature_net="vae", feature_net_path="", num_samples=256,
                               ddim_steps=50, num_boot=50))
  # clip_x0 > 0 clips the predicted x0 of the unit-variance latents to [-clip_x0, clip_x0]
  # at every sampler step (0: off, as in the paper).
  c.sample = mlc.ConfigDict(dict(num_images=1000, sampler="ddpm", steps=1000, eta=0.0,
                                 batch_size=64, clip_x0=0.0))
  c.filter = mlc.ConfigDict(dict(k=5, keep_fraction=0.5, copy_quantile=0.05,
                                 copy_factor=1.0, max_real=2000))
  c.optim.update(dict(schedule="constant", weight_decay=0.0))
  if stage == "vae":
    c.optim.update(dict(name="adam", lr=1e-6))
    c.train.update(dict(batch_size=4, num_epochs=1000.0))
  elif stage == "unet":
    c.model.size = "ldm"
    c.optim.update(dict(name="adamw", lr=1e-4, weight_decay=1e-2))
    c.train.update(dict(batch_size=32, num_epochs=1000.0))
  if size == "small":
    # A real-data run that finishes in well under an hour on a 2-core CPU: 64 px images,
    # the tiny-width VAE and UNet presets (XLA:CPU convolutions are slow; see DESIGN.md).
    c.model.size = "tiny"
    c.ema_decay = 0.999
    c.train.update(dict(num_epochs=0.0, eval_batch_size=32, max_eval_examples=256))
    c.eval.num_boot = 30
    c.sample.update(dict(num_images=256, sampler="ddim", steps=50))
    # The small, briefly trained UNet lets sampled latents drift to std ~10; clipping
    # x0_hat to +-2 (unit-variance latents) halves FD (docs/results/ldm.md).
    c.sample.clip_x0 = 2.0
    if stage == "vae":
      c.optim.lr = 2e-4
      c.train.update(dict(batch_size=8, num_steps=1500, eval_every=500, checkpoint_every=500))
    elif stage == "unet":
      c.optim.update(dict(lr=5e-4, warmup_fraction=0.02))
      c.train.update(dict(batch_size=32, num_steps=4000, eval_every=500,
                          checkpoint_every=500))
  elif size == "tiny":
    c.model.size = "tiny"
    c.ema_decay = 0.9
    c.diffusion.num_timesteps = 50
    config_lib.set_tiny_train(c)
    c.eval.update(dict(num_samples=16, ddim_steps=5, num_boot=5))
    c.sample.update(dict(num_images=16, sampler="ddim", steps=5, batch_size=8))
    c.filter.max_real = 64
    c.train.max_train_examples = 64  # a smoke test encodes 64 images, not all of kermany
  return c


def pipeline_stages(*, data: str = "kermany", size: str = "paper",
                    seed: int = 0) -> dict[str, mlc.ConfigDict]:
  """vae → unet → sample → filter, each stage reading the earlier ones' outputs."""
  stages = {s: stage_config(s, data=data, size=size, seed=seed) for s in STAGES}
  for s in ("unet", "sample", "filter"):
    stages[s].vae_from = "stage:vae"
  stages["sample"].unet_from = "stage:unet"
  stages["filter"].synthetic_dir = "stage:sample/images"
  return stages


def get_config(arg: str = "") -> mlc.ConfigDict:
  a = config_lib.parse_variant(arg, DEFAULTS, CHOICES)
  stage = a.pop("stage")
  if stage == "all":
    return config_lib.pipeline(pipeline_stages(**a)).lock()
  return stage_config(stage, **a).lock()
