"""DCL-CsTP pretraining (dual-stream paper, Section III) and its baselines/ablations.

  python -m medrep_jax.main --config configs/dcl_cstp.py:data=kermany,size=small \
      --workdir runs/dcl_cstp

Paper values (Section IV-A-1, Stage 2): SGD momentum 0.9, weight decay 1e-4, batch 128,
lr 0.03, 200 epochs with lr x 0.1 at epochs 120 and 160; α = 0.3, β = 0.7 (eq. 10);
momentum m = 0.999 (eq. 5); bank K = 4,096 (classification) or 512 (segmentation).
The paper does not state τ; MoCo-v2's 0.2 is the default.

Variant args: variant=dcl_cstp|simclr|mocov2|simsiam|no_global|no_local|mlp_projector|
standard_attention (the baselines and ablations of Tables 1-3), size=paper|small|tiny,
data=<dataset>, task=classification|segmentation (sets the bank size K: 4096 or 512),
synthetic_fraction=<0..1> (the fraction of the curated synthetic pool added, Table 4: 0, 0.1,
0.5, 1; with --config.synthetic_dir=<ldm images/ folder>), synthetic_only=True (Table 4's
"synthetic only" row: that part of the pool without the real images), seed=<int>.
(`--config.synthetic_per_real=x` keeps the older rule: x * |real| synthetic images.)
"""
import ml_collections as mlc

from medrep_jax import config_lib
from medrep_jax.data import registry

_BASELINE = dict(model=dict(projector="mlp"), augment=dict(policy="simclr"))
# variant -> the config blocks it switches away from the full method.
VARIANT_SWITCHES = {
    "dcl_cstp": {},
    "simclr": dict(loss=dict(global_stream="none", local_stream="none", nt_xent=True),
                   **_BASELINE),
    "mocov2": dict(loss=dict(global_stream="moco", local_stream="none"), **_BASELINE),
    "simsiam": dict(loss=dict(global_stream="none", local_stream="simsiam"), **_BASELINE),
    "no_global": dict(loss=dict(global_stream="none")),
    "no_local": dict(loss=dict(local_stream="none")),
    "mlp_projector": dict(model=dict(projector="mlp")),
    "standard_attention": dict(model=dict(attention="standard")),
}
VARIANTS = tuple(VARIANT_SWITCHES)
DEFAULTS = dict(variant="dcl_cstp", size="paper", data="kermany", task="classification",
                synthetic_fraction=0.0, synthetic_only=False, seed=0)
CHOICES = dict(variant=VARIANTS, size=("paper", "small", "tiny"), data=registry.PRESETS,
               task=("classification", "segmentation"))


def dcl_cstp_config(*, variant: str = "dcl_cstp", data: str = "kermany",
                    size: str = "paper", task: str = "classification",
                    synthetic_fraction: float = 0.0, synthetic_only: bool = False,
                    seed: int = 0) -> mlc.ConfigDict:
  """A complete, unlocked pretraining config for one variant."""
  c = config_lib.base_config("dcl_cstp")
  c.seed = seed
  c.variant = variant
  c.data = registry.data_config(data)
  c.data.image_size = 224
  c.synthetic_dir = ""
  c.synthetic_fraction = float(synthetic_fraction)  # of the synthetic pool (data.mixing)
  c.synthetic_only = bool(synthetic_only)
  c.synthetic_per_real = 0.0  # the older rule, exclusive with synthetic_fraction
  c.model = mlc.ConfigDict(dict(encoder="resnet50", norm="batch", small_input=False,
                                projector="cstp", attention="csa", embed_dim=128,
                                cstp_width=512, cstp_heads=8, mlp_hidden=2048,
                                predictor_hidden=512))
  c.loss = mlc.ConfigDict(dict(global_stream="dual", local_stream="simsiam",
                               local_predictor=True, nt_xent=False, alpha=0.3, beta=0.7,
                               temperature=0.2, nt_xent_temperature=0.2, momentum=0.999,
                               bank_size=4096 if task == "classification" else 512,
                               # K shrinks to the largest multiple of the batch that the
                               # training set holds (False: a K that cannot fit fails)
                               bank_auto=True))
  # Views: policy "strong" (Sec. III-C-1) or the baselines' "simclr". The strong policy's
  # fields (read by `augment.policy_kwargs`; `strong_augment` documents them) default to
  # the code's: a random resized crop on every view (crop_mode="always", the paper's
  # description; "drawn" makes the crop one of the drawn ops), then num_ops=2 ops drawn
  # from the other `ops`, each with a magnitude m ~ U(magnitude) scaling its range at m=1:
  # rotate +-rotate_degrees, crop area (1 - m(1 - crop_scale[0]), crop_scale[1]) at aspect
  # crop_ratio, color jitter m*jitter, sharpness/brightness 1 +- m*enhance, PNP photon
  # scale from pnp_lam[1] (m=0) down to pnp_lam[0] (m=1). Only read when policy="strong".
  c.augment = mlc.ConfigDict(dict(
      policy="strong",
      strong=dict(num_ops=2, crop_mode="always",
                  ops=("crop", "rotate", "color_jitter", "autocontrast", "equalize",
                       "sharpness", "brightness", "pnp"),
                  magnitude=(0.0, 1.0), rotate_degrees=30.0, crop_scale=(0.2, 1.0),
                  crop_ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1), enhance=0.9,
                  pnp_lam=(25.0, 1000.0), pnp_exact=False, fill="zero")))
  c.monitor = mlc.ConfigDict(dict(knn_k=20, max_train=2000))
  c.optim.update(dict(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, schedule="step",
                      step_boundaries=(0.6, 0.8), step_factor=0.1))
  c.train.update(dict(batch_size=128, num_epochs=200.0, eval_every=0, log_every=50))
  if size == "small":  # a CPU-feasible comparison run: 1-2.5 s/step on 2 cores
    # ResNet-10 (16 filters) with the 3x3 stride-1 stem at 32 px: the last stage is 4x4
    # (XLA:CPU is very slow on 3x3 convs over 2x2 maps; DESIGN.md, machine facts).
    c.data.image_size = 32
    c.model.update(dict(encoder="resnet_tiny", small_input=True, cstp_width=64, cstp_heads=4,
                        mlp_hidden=256, predictor_hidden=64, embed_dim=64))
    c.loss.bank_size = 1024 if task == "classification" else 512
    c.train.update(dict(batch_size=64, num_epochs=0.0, num_steps=200, eval_every=0,
                        checkpoint_every=100, eval_batch_size=128, max_eval_examples=0))
  elif size == "tiny":
    c.data.image_size = 32
    c.model.update(dict(encoder="resnet_tiny", small_input=True, cstp_width=16, cstp_heads=2,
                        mlp_hidden=32, predictor_hidden=16, embed_dim=16))
    c.loss.bank_size = 32
    config_lib.set_tiny_train(c)
    c.monitor.max_train = 16
  for block, values in VARIANT_SWITCHES[variant].items():
    c[block].update(values)
  return c


def get_config(arg: str = "") -> mlc.ConfigDict:
  return dcl_cstp_config(**config_lib.parse_variant(arg, DEFAULTS, CHOICES)).lock()
