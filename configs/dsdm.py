"""DSDM / DiffusionDCI (Yang et al.): a dual semantic diffusion model, then segmentation.

  python -m medrep_jax.main --config configs/dsdm.py:stage=generator,size=small \
      --config.ref_encoder_from=runs/dsdm_ref --workdir runs/dsdm_gen

Paper values (Sec. IV-B, V-A2): the SDM denoising U-Net with SPADE on the one-hot mask in
the decoder, a ResNet-18 reference encoder (512-d, pretrained contrastively) feeding MCAA
(eq. 10-11) at each attention resolution; the hybrid loss with learned-range variance
(eq. 14-16); a cosine schedule; Adam, lr 1e-4, batch 10, 50,000 iterations at 256 px;
classifier-free guidance with s = 3 (eq. 17). Not stated, so choices here (shared/specs/
dsdm.md): λ = 0.001 (improved DDPM), T = 1000, p_uncond = 0.2 with both conditions dropped
together (SDM), SPADE also in the middle block (`model.spade_mid`, SDM), the U-Net widths
(SDM's 256 px layout at base width 128), zeros as the null mask and null reference, the
reference encoder's SimCLR recipe (this library's camcontrast `simclr` stage on the same
images, temperature 0.1) and the sampler (DDPM with 1000 steps; `sample.sampler=ddim`).

Stages (configs/pipeline_dsdm.py chains them):
  ref_encoder  SimCLR ResNet-18 on the train images (the reference encoder);
  generator    the DSDM (needs --config.ref_encoder_from for the reference variants);
  sample       K images per train mask, in the style of another train image
               (--config.generator_from); an image+mask dataset in WORKDIR/images;
  filter       automatic curation of those pairs (--config.synthetic_dir=<sample>/images,
               --config.ref_encoder_from for the feature space);
  seg          segmentation from the frozen DSDM's features (--config.generator_from;
               `fusion`, `synthetic_fraction` with --config.synthetic_dir);
  probe        block x timestep pixel probes of the DSDM's features (Fig. 3);
  table        Table 1/2-, 5- and Fig. 6-shaped tables of finished runs
               (--config.table.generation.<row>=<generator run>, .segmentation, .synthetic).

Segmentation (Sec. IV-C2, V-A2): CE, Adam 1e-3, batch 12, 200 epochs, hflip + colour
jitter; DSDM features at t_feat (unstated: 200 of 1000, inside Fig. 3's good range) from
decoder blocks `fusion_blocks`. The paper's "blocks 6-10" are SDM output_blocks[6..10],
which are dec_7..dec_11 of this library's DiffusionUNet (`return_features`: dec_i is the
i-th up-path block, deepest first, 1-based; `models/feature_fusion.py`): at paper size
those are the 32 and 64 px levels of the 256 px U-Net. Small and tiny sizes take the
blocks at the same relative depth (the middle levels of their decoders).

Variant args:
  stage=ref_encoder|generator|sample|filter|seg|probe
  fusion=caa|skip|none  (Table 5: CAA, skip connection, the plain denoising U-Net)
  synthetic_fraction=<0..1>  (seg: the fraction of the synthetic pool added, Fig. 6)
  variant=uncond|mask|reference|mask_reference  (Table 1's rows)
  guidance_scale=<float>  (s of eq. 17; 0 = Table 2's "no guidance" row)
  color_norm=True|False  (modified Reinhard in CIELAB, grey images: L; Table 2)
  size=paper|small|tiny  (small: 32 px and a 3-level UNet of width 32 for a 2-core CPU;
        tiny: 16 px, 2 steps, tests)
  data=busi  (busi_256: background / benign / malignant masks; any image+mask preset)
  seed=<int>
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

camcontrast = config_lib.config_module("camcontrast")

STAGES = ("ref_encoder", "generator", "sample", "filter", "seg", "probe", "table")
VARIANTS = ("uncond", "mask", "reference", "mask_reference")
DEFAULTS = dict(stage="ref_encoder", variant="mask_reference", guidance_scale=3.0,
                color_norm=True, fusion="caa", synthetic_fraction=0.0, size="paper",
                data="busi", seed=0)
CHOICES = dict(stage=STAGES, variant=VARIANTS, size=("paper", "small", "tiny"),
               data=registry.PRESETS, fusion=("caa", "skip", "none"))
# Decoder blocks whose DSDM features the segmentation net takes (see the docstring).
FUSION_BLOCKS = {"paper": ("dec_7", "dec_8", "dec_9", "dec_10", "dec_11"),
                 "small": ("dec_3", "dec_4", "dec_5"),
                 "tiny": ("dec_2", "dec_3")}
PROBE_TIMESTEPS = {"paper": (99, 199, 299, 399, 499, 599, 699, 799, 899, 999),
                   "small": (50, 100, 200, 400, 600, 800),
                   "tiny": (5, 25)}
IMAGE_SIZE = {"paper": 256, "small": 32, "tiny": 16}

# The generator U-Net per size (DiffusionUNet attributes; see models/diffusion_unet.py).
UNETS = {
    # SDM's 256 px layout (channel_mult 1,1,2,2,4,4; attention at 32, 16, 8 px) at base 128.
    "paper": dict(size="small", base_width=128, channel_mult=(1, 1, 2, 2, 4, 4),
                  num_res_blocks=2, attention_resolutions=(8, 16, 32), head_dim=64,
                  spade_hidden=128, ref_token_dim=64),
    # 32 px: 32-16-8 maps, attention (and MCAA) at 16 and 8 px. (At 64 px with a fourth
    # level one step takes 5.3 s on one CPU core, docs/results/benchmarks.md: too slow for
    # the few thousand steps of a CPU experiment.)
    "small": dict(size="small", base_width=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(2, 4), head_dim=32, spade_hidden=32,
                  ref_token_dim=32),
    "tiny": dict(size="tiny", base_width=0, channel_mult=(), num_res_blocks=0,
                 attention_resolutions=(), head_dim=0, spade_hidden=0, ref_token_dim=0),
}


def data_config(data: str = "busi", size: str = "paper", color_norm: bool = True):
  """The image+mask data: padded to square (BUSI is not square), Reinhard-normalized."""
  c = registry.data_config(data, image_size=IMAGE_SIZE[size], resize_mode="pad")
  if color_norm and data == "busi":
    # The "whole-slide average" of the paper's modified Reinhard: here the mean LAB
    # statistics (L for grey) of one class folder of the data root. Other data sets: set
    # data.color_norm="reinhard" and data.color_norm_reference (or color_norm_stats).
    c.color_norm = "reinhard"
    c.color_norm_reference = "benign/images"
  return c


def ref_encoder_config(*, data: str = "busi", size: str = "paper", seed: int = 0,
                       color_norm: bool = True, **unused) -> mlc.ConfigDict:
  """The reference encoder: this library's SimCLR (camcontrast `simclr`) with ResNet-18."""
  del unused
  c = camcontrast.stage_config("pretrain", variant="simclr", data=data,
                               size="tiny" if size == "tiny" else "small", seed=seed)
  c.method, c.stage = "dsdm", "ref_encoder"
  c.data = data_config(data, size, color_norm)
  if size == "tiny":  # the camcontrast tiny U-Net encoder (16-d pooled): compiles in seconds
    c.model.update(dict(encoder="unet_encoder", unet_widths=(8, 16)))
  else:
    # The ImageNet stem (stride 4) also at 32 px: the style embedding needs no 32x32 maps,
    # and the CIFAR stem costs ~4 s per SimCLR step on a 2-core CPU (vs ~0.6 s).
    c.model.update(dict(encoder="resnet18", small_input=False, mlp_hidden=512))
  c.loss.temperature = 0.1
  if size == "paper":
    c.train.update(dict(batch_size=128, num_steps=5000, eval_every=1000))
  elif size == "small":
    c.train.update(dict(batch_size=64, num_steps=600, eval_every=0, checkpoint_every=600))
  return c


def generator_config(*, variant: str = "mask_reference", guidance_scale: float = 3.0,
                     color_norm: bool = True, size: str = "paper", data: str = "busi",
                     seed: int = 0, **unused) -> mlc.ConfigDict:
  """The DSDM generator (Sec. IV-B) of one Table 1 variant."""
  del unused
  c = config_lib.base_config("dsdm")
  c.stage, c.variant, c.seed = "generator", variant, seed
  c.data = data_config(data, size, color_norm)
  c.ref_encoder_from = ""
  c.ema_decay = 0.9999
  c.p_uncond = 0.2  # both conditions dropped together (eq. 17's null condition)
  c.model = mlc.ConfigDict(dict(**UNETS[size], spade_mid=True, ref_embed_dim=512,
                                ref_attention_resolutions=(), dropout=0.0))
  c.loss = mlc.ConfigDict(dict(lambda_vlb=0.001))
  c.augment = mlc.ConfigDict(dict(hflip=True))
  c.diffusion = mlc.ConfigDict(dict(schedule="cosine", num_timesteps=1000))
  c.sample = mlc.ConfigDict(dict(sampler="ddpm", steps=1000, eta=0.0,
                                 guidance_scale=float(guidance_scale), batch_size=16))
  # extra_guidance_scales: the same metrics at more scales s, as `fd@s0` etc. (Table 2).
  # lpips_weights: an LPIPS-VGG .npz (medrep_jax/eval/lpips.py) adds `lpips_diversity`.
  c.eval = mlc.ConfigDict(dict(num_samples=500, num_boot=50, diversity_masks=50,
                               diversity_samples=10, extra_guidance_scales=(0.0,),
                               lpips_weights=""))
  c.optim.update(dict(name="adam", lr=1e-4, weight_decay=0.0, schedule="constant"))
  c.train.update(dict(batch_size=10, num_steps=50_000, eval_every=10_000,
                      checkpoint_every=5_000, eval_split="test"))
  if size == "small":
    c.ema_decay = 0.999
    c.optim.update(dict(lr=2e-4, warmup_fraction=0.02))
    c.sample.update(dict(sampler="ddim", steps=50, batch_size=64))
    c.eval.update(dict(num_samples=128, num_boot=30, diversity_masks=16,
                       diversity_samples=4))
    c.train.update(dict(batch_size=8, num_steps=2000, eval_every=2000,
                        checkpoint_every=500, log_every=50, eval_batch_size=64,
                        num_threads=2))
  elif size == "tiny":
    c.ema_decay = 0.9
    c.diffusion.num_timesteps = 50
    c.model.ref_embed_dim = 16  # the tiny reference encoder's pooled width
    config_lib.set_tiny_train(c)
    c.sample.update(dict(sampler="ddim", steps=4, batch_size=8))
    c.eval.update(dict(num_samples=8, num_boot=4, diversity_masks=2, diversity_samples=2,
                       extra_guidance_scales=()))
  return c


def _downstream(stage: str, size: str, data: str, color_norm: bool, seed: int):
  """The shared fields of the stages after the generator (`seg` trains; the rest do not)."""
  c = config_lib.base_config("dsdm")
  c.stage, c.seed = stage, seed
  c.data = data_config(data, size, color_norm)
  c.generator_from = ""
  if stage != "seg":
    c.train.update(dict(num_steps=0, num_epochs=0.0))
  return c


def sample_config(*, guidance_scale: float = 3.0, color_norm: bool = True,
                  size: str = "paper", data: str = "busi", seed: int = 0,
                  **unused) -> mlc.ConfigDict:
  """K samples per train mask with a reference from another train image (Sec. V-A1)."""
  del unused
  c = _downstream("sample", size, data, color_norm, seed)
  # reference: "other" | "self" | an image file or folder; mask_dir: PNG class-id masks
  # to use instead of the split's; max_masks 0 = every mask of the split.
  c.sample = mlc.ConfigDict(dict(mask_split="train", mask_dir="", reference="other",
                                 max_masks=0, num_per_mask=4,
                                 guidance_scale=float(guidance_scale)))
  if size == "small":
    c.sample.update(dict(max_masks=256, num_per_mask=2))
  elif size == "tiny":
    c.sample.update(dict(max_masks=4, num_per_mask=2))
  return c


def filter_config(*, color_norm: bool = True, size: str = "paper", data: str = "busi",
                  seed: int = 0, **unused) -> mlc.ConfigDict:
  """The automatic curation of `ldm`, in the reference encoder's feature space."""
  del unused
  c = _downstream("filter", size, data, color_norm, seed)
  c.synthetic_dir, c.ref_encoder_from, c.vae_from = "", "", ""
  c.eval = mlc.ConfigDict(dict(feature_net="encoder", feature_net_path=""))
  # The paper's clinicians kept 2,000 images; keep the most realistic 80% of non-copies.
  c.filter = mlc.ConfigDict(dict(k=5, keep_fraction=0.8, copy_quantile=0.05,
                                 copy_factor=1.0, max_real=2000))
  if size == "tiny":
    c.filter.max_real = 32
  return c


def seg_config(*, fusion: str = "caa", synthetic_fraction: float = 0.0,
               color_norm: bool = True, size: str = "paper", data: str = "busi",
               seed: int = 0, **unused) -> mlc.ConfigDict:
  """Segmentation from the frozen DSDM's features (Sec. IV-C2, V-A2, Table 5, Fig. 6)."""
  del unused
  c = _downstream("seg", size, data, color_norm, seed)
  c.fusion = fusion
  c.fusion_blocks = FUSION_BLOCKS[size]
  c.t_feat = {"tiny": 10}.get(size, 200)  # schedule index of q_sample(x0, t_feat)
  c.init_from_generator = True  # copy every matching DSDM array (init_from.txt)
  c.synthetic_dir = ""  # a sample or filter run's images/ folder
  c.synthetic_fraction = float(synthetic_fraction)
  c.augment = mlc.ConfigDict(dict(enabled=True, jitter_p=0.8))
  c.optim.update(dict(name="adam", lr=1e-3, weight_decay=0.0, schedule="constant"))
  c.train.update(dict(batch_size=12, num_epochs=200.0, eval_every=0, eval_split="test",
                      checkpoint_every=2000))
  if size == "small":
    c.train.update(dict(num_epochs=0.0, num_steps=800, eval_every=400,
                        checkpoint_every=400, log_every=25, eval_batch_size=32,
                        num_threads=2))
  elif size == "tiny":
    config_lib.set_tiny_train(c)
  return c


def probe_config(*, color_norm: bool = True, size: str = "paper", data: str = "busi",
                 seed: int = 0, **unused) -> mlc.ConfigDict:
  """The Fig. 3 probe: a pixel MLP per (decoder block, t) on the frozen DSDM features."""
  del unused
  c = _downstream("probe", size, data, color_norm, seed)
  c.probe = mlc.ConfigDict(dict(blocks=(), timesteps=PROBE_TIMESTEPS[size],
                                condition="null", max_train=200, max_test=100, hidden=32,
                                steps=500, lr=1e-3, batch_size=16))
  if size == "tiny":
    c.probe.update(dict(max_train=8, max_test=8, steps=20, batch_size=8))
  return c


def table_config(*, size: str = "paper", data: str = "busi", color_norm: bool = True,
                 seed: int = 0, **unused) -> mlc.ConfigDict:
  """Tables of finished runs: {row name: run workdir} per section (empty: skipped)."""
  del unused
  c = _downstream("table", size, data, color_norm, seed)
  del c.generator_from
  # Every known row, "" = not in the table; set e.g. --config.table.segmentation.caa=RUN.
  c.table = mlc.ConfigDict(dict(
      generation={v: "" for v in VARIANTS + ("mask_reference_no_color_norm",)},
      segmentation={f: "" for f in ("none", "skip", "caa")},
      synthetic={f"f{p}": "" for p in (0, 25, 50, 75, 100)}))
  return c


BUILDERS = {"ref_encoder": ref_encoder_config, "generator": generator_config,
            "sample": sample_config, "filter": filter_config, "seg": seg_config,
            "probe": probe_config, "table": table_config}


def get_config(arg: str = "") -> mlc.ConfigDict:
  a = config_lib.parse_variant(arg, DEFAULTS, CHOICES)
  return BUILDERS[a.pop("stage")](**a).lock()
