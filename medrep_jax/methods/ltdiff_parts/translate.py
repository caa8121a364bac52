"""LTDiff++ stage `translate` (Sec. III-B, DESIGN reading): A -> A' by SDEdit-style sampling.

For every pair (A, B) of `train.eval_split` (`translate.max_slices` > 0: that many, spread
over the split):

  Z_A, skips_A = E(A)                       the frozen ae run (`ae_from`, "" = the one the
                                            latent_ddpm run was trained on)
  z_T  = q_sample(Z_A', t*, ε)              Z_A' = normalized Z_A; the paper's
                                            Z~_A = Z_A + η, η ~ N(0, σ²), as SDEdit
  Z_A' <- reverse chain t* -> 0 of ε_θ(z_t, t, concat=Z_A')   (`ddpm_from`, EMA weights)
  A'   = D(Z_A' denormalized, skips_A)

`translate.t_star` counts diffusion steps, 1 <= t* <= T (T of the latent_ddpm run): the
start is the schedule index t* - 1, i.e. ᾱ_{t*} in the 1-based DDPM notation, and t* = T
starts from (almost) pure noise. `translate.sampler`: "ddpm" (ancestral, every index
t*-1 .. 0; `translate.steps` is not used) or "ddim" (`translate.steps` evenly spaced
indices from t*-1 to 0, at most t*; `translate.eta`). Both are the diffusion core's
samplers with `x_T` and `t_start`.

Skips: with the ae run's `skip_mode="source"` (its default) the decoder reads A's encoder
skips X_(i,0), so texture of A can leak into A' past the latent (the latent DDPM changes
only the bottleneck); `skip_mode="none"` decodes from the translated latent alone.

Writes under WORKDIR/translated/ one float32 .npy per slice, in HU, named alike in
A/ (input), A_prime/ (translated) and B/ (reference), the layout the radiomics command
reads:

  python -m medrep_jax.radiomics --images WORKDIR/translated/A \
      --reference WORKDIR/translated/B --compare ltdiff=WORKDIR/translated/A_prime

and the report: L1 (unit and HU) and PSNR (data range 1) of A' vs B against A vs B, and a
figure of A / A' / B / |A - B| / |A' - B| crops.
"""
from __future__ import annotations

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from medrep_jax import methods
from medrep_jax.config_lib import ConfigError
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.data import loader, subsets
from medrep_jax.diffusion import gaussian, samplers
from medrep_jax.eval import figures as fig_lib
from medrep_jax.methods import base
from medrep_jax.methods.ltdiff_parts import data as data_lib
from medrep_jax.methods.ltdiff_parts import latent_ddpm

SAMPLERS = ("ddpm", "ddim")
FOLDERS = ("A", "A_prime", "B")


def check_t_star(t_star, num_timesteps: int) -> int:
  """t* as an int in [1, T], else a ConfigError naming `translate.t_star`."""
  t = int(t_star)
  if t != t_star or not 1 <= t <= int(num_timesteps):
    raise ConfigError(f"translate.t_star={t_star!r} must be an integer in [1, T] = "
                      f"[1, {num_timesteps}] (T: diffusion.num_timesteps of the latent_ddpm "
                      f"run): the number of noising steps applied to Z_A before sampling")
  return t


def sdedit_start(sched, z_a, t_star: int, rng):
  """(x_T, start index): Z_A noised to t*, q_sample(Z_A, t* - 1, ε ~ N(0, I) from rng)."""
  index = check_t_star(t_star, sched.num_timesteps) - 1
  noise = jax.random.normal(rng, z_a.shape, jnp.float32)
  t = jnp.full((z_a.shape[0],), index, jnp.int32)
  return gaussian.q_sample(sched, z_a, t, noise), index


def make_translator(apply_fn, sched, t_star: int, *, sampler: str = "ddpm", steps: int = 50,
                    eta: float = 0.0, sharding=None):
  """A jitted `translate(params, z_a, rng) -> Z_A'` on normalized latents.

  `apply_fn(params, x, t, cond)` is the conditional ε-model; rng splits into the start's
  noise and the sampler's.
  """
  if sampler not in SAMPLERS:
    raise ConfigError(f"translate.sampler={sampler!r}; expected one of {SAMPLERS}")
  t_star = check_t_star(t_star, sched.num_timesteps)
  kwargs = dict(parameterization="eps", t_start=t_star - 1, sharding=sharding)
  if sampler == "ddim":
    if int(steps) < 1:
      raise ConfigError(f"translate.steps must be >= 1 for ddim, got {steps}")
    kwargs.update(num_steps=min(int(steps), t_star), eta=float(eta))
  sample_fn = samplers.SAMPLERS[sampler]

  def translate(params, z_a, rng):
    k_start, k_sample = jax.random.split(rng)
    x_t, _ = sdedit_start(sched, z_a, t_star, k_start)
    model_fn = lambda x, t, c: apply_fn(params, x, t, c)
    return sample_fn(model_fn, sched, None, k_sample, cond=z_a, x_T=x_t, **kwargs)

  return jax.jit(translate)


def slice_names(pairs, n: int) -> list[str]:
  """File-safe, unique names of a pair source's elements (its slice ids when it has them)."""
  ids = getattr(pairs, "ids", None)
  if ids is None or len(ids) != n:
    return [f"{i:05d}" for i in range(n)]
  names = [re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(str(p))[0]).strip("_.")
           for p in ids]
  if len(set(names)) != n or not all(names):
    return [f"{i:05d}_{s}" for i, s in enumerate(names)]
  return names


class TranslateStage(base.Task):
  """A -> A' for every slice of the eval split; writes translated/{A,A_prime,B}/*.npy."""

  def run(self) -> base.Result:
    c, tc = self.config, self.config.translate
    if not c.ddpm_from:
      raise ConfigError("ddpm_from is empty: point it at a finished `ltdiff` stage="
                        "latent_ddpm run (in the pipeline: 'stage:latent_ddpm')")
    trained = methods.load_trained(c.ddpm_from, method="ltdiff")
    denoiser, ema, ae = self._translator_parts(trained)
    ddpm, extras = trained.stage, trained.run.extras
    t_star = check_t_star(tc.t_star, ddpm.sched.num_timesteps)
    ae.check_data(c.data)

    n_dev = self.mesh.shape[mesh_lib.DATA]
    sharding = NamedSharding(self.mesh, P(mesh_lib.DATA))
    apply_fn = lambda p, x, t, cond: denoiser.apply({"params": p}, x, t, concat=cond)
    translate = make_translator(apply_fn, ddpm.sched, t_star, sampler=str(tc.sampler),
                                steps=int(tc.steps), eta=float(tc.eta), sharding=sharding)
    params = jax.device_put(ema, NamedSharding(self.mesh, P()))
    norm = jax.tree.map(jnp.asarray, {k: extras[k] for k in ("latent_shift", "scale_factor")})
    rng = jax.random.key(int(tc.seed))

    def a_to_a_prime(i, a):
      z_a, skips = ae.encode(ae.variables, jax.device_put(a, sharding))
      z_out = translate(params, latent_ddpm.normalize(z_a, norm), jax.random.fold_in(rng, i))
      return ae.decode(ae.variables, latent_ddpm.denormalize(z_out, norm), skips)

    split = c.train.eval_split
    names, images = translate_split(
        c.data, split, a_to_a_prime, batch_size=int(tc.batch_size), num_devices=n_dev,
        max_slices=int(tc.max_slices), progress=bool(c.train.progress))
    root = write_translated(self.workdir, names, images, c.data)
    metrics = translation_metrics(images, c.data)
    metrics.update(num_slices=len(names), t_star=t_star,
                   sampler_steps=(t_star if tc.sampler == "ddpm"
                                  else min(int(tc.steps), t_star)))
    fig = translation_figure(images, int(tc.figure_slices), self.workdir)
    level, width = data_lib.window(c.data)
    lines = [
        f"A -> A' on the {split} split ({len(names)} slices): Z_A noised to t* = {t_star} "
        f"of T = {ddpm.sched.num_timesteps}, {tc.sampler} sampling "
        f"({metrics['sampler_steps']} steps) conditioned on Z_A, EMA weights of "
        f"`{trained.run.path}`; decoded by `{ae.run_dir}` with skip_mode "
        f"{ae.skip_mode!r}" + (" (A's encoder skips: texture of A can leak into A')"
                               if ae.skip_mode == "source" else "") + ".",
        "",
        f"HU slices (window [{level - width / 2:g}, {level + width / 2:g}]) in `{root}`: "
        f"A/, A_prime/, B/ with matching file names. Radiomic concordance:",
        "",
        f"    python -m medrep_jax.radiomics --images {root / 'A'} --reference "
        f"{root / 'B'} --compare ltdiff={root / 'A_prime'} "
        f"--output {self.workdir / 'ccc'}",
        "",
        *translation_table(metrics)]
    return base.Result(metrics, {"A / A' / B / |A-B| / |A'-B| (center crops)": fig}, lines)


  def _translator_parts(self, trained):
    """(denoiser module, its EMA params, codec) of a latent_ddpm or joint run."""
    stage, ema = trained.config.get("stage", ""), trained.run.extras.get("ema")
    if stage == "joint":  # its EMA denoiser, and its EMA decoder in the ae's encoder-decoder
      if self.config.ae_from:
        raise ConfigError("ae_from must be empty with a joint run as ddpm_from: the joint "
                          "run holds its own fine-tuned decoder")
      joint = trained.stage
      ae = joint.ae.with_variables({"params": ema["unetpp"],
                                    "batch_stats": trained.variables["batch_stats"]["unetpp"]})
      return joint.model.denoiser, ema["denoiser"], ae
    if stage != "latent_ddpm":
      raise ConfigError(f"ddpm_from={self.config.ddpm_from!r} is a stage {stage!r} run; "
                        f"translate samples with a latent_ddpm or joint run")
    ae = latent_ddpm.load_codec(trained.config, self.config.ae_from)
    if ae.latent_channels != int(trained.stage.info.channels):
      raise ConfigError(f"the ae run {ae.run_dir} has {ae.latent_channels} latent channels, "
                        f"the latent_ddpm run {trained.run.path} "
                        f"{trained.stage.info.channels}")
    return trained.stage.model, ema, ae


# ---- shared by every A -> A' translator (this stage, `direct`)
def translate_split(data, split: str, a_to_a_prime, *, batch_size: int, num_devices: int = 1,
                    max_slices: int = 0, progress: bool = False
                    ) -> tuple[list[str], dict[str, np.ndarray]]:
  """(slice names, {"A", "A_prime", "B": (N, H, W) float32 in [0, 1]}) over the split's pairs.

  `a_to_a_prime(i, a)` maps batch i of A slices (B, H, W, 1), B a multiple of
  `num_devices` (padding rows are dropped), to A' in [0, 1]; `max_slices` > 0 keeps that
  many pairs spread over the split.
  """
  pairs = data_lib.pair_source(data, split, progress=progress)
  names = slice_names(pairs, len(pairs))
  if 0 < max_slices < len(pairs):
    pairs = subsets.spread_subset(pairs, max_slices)
    names = [names[i] for i in pairs.indices] if hasattr(pairs, "indices") else [
        f"{i:05d}" for i in range(max_slices)]
  batch = max(num_devices, (batch_size // num_devices) * num_devices)
  out = {k: [] for k in FOLDERS}
  batches = loader.eval_batches(pairs, [], global_batch=batch, process_index=0,
                                process_count=1)
  for i, b in enumerate(tqdm(batches, total=-(-len(pairs) // batch), desc="translating",
                             disable=not progress)):
    a_prime = a_to_a_prime(i, jnp.asarray(b["image_a"], jnp.float32))
    keep = b["_valid"] > 0
    out["A"].append(np.asarray(b["image_a"])[keep])
    out["A_prime"].append(np.asarray(mesh_lib.to_host(a_prime))[keep])
    out["B"].append(np.asarray(b["image_b"])[keep])
  return names, {k: np.concatenate(v)[..., 0].astype(np.float32) for k, v in out.items()}


def write_translated(workdir, names: list[str], images: dict[str, np.ndarray], data):
  """WORKDIR/translated/{A,A_prime,B}/<name>.npy in HU; returns the translated/ folder."""
  root = pathlib.Path(workdir) / "translated"
  for key in FOLDERS:
    (root / key).mkdir(parents=True, exist_ok=True)
    hu = data_lib.to_hu(images[key], data).astype(np.float32)
    for name, x in zip(names, hu):
      np.save(root / key / f"{name}.npy", x)
  return root


def translation_metrics(images: dict[str, np.ndarray], data) -> dict:
  """L1 (unit and HU) and PSNR (data range 1) of A vs B, A' vs B and A' vs A."""
  _, width = data_lib.window(data)
  out = {}
  for label, x, ref in (("a_b", images["A"], images["B"]),
                        ("aprime_b", images["A_prime"], images["B"]),
                        ("aprime_a", images["A_prime"], images["A"])):
    l1 = np.mean(np.abs(x - ref), axis=(1, 2))
    mse = np.mean((x - ref) ** 2, axis=(1, 2))
    out[f"l1_{label}"] = float(np.mean(l1))
    out[f"mae_hu_{label}"] = float(np.mean(l1)) * width
    out[f"psnr_{label}"] = float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))
  return out


def translation_table(metrics: dict) -> list[str]:
  """The markdown rows of A vs B and A' vs B (`translation_metrics`)."""
  return ["| pair | L1 | L1 (HU) | PSNR (dB) |", "|---|---|---|---|",
          *(f"| {name} | {metrics[f'l1_{k}']:.4f} | {metrics[f'mae_hu_{k}']:.1f} | "
            f"{metrics[f'psnr_{k}']:.2f} |" for name, k in (("A vs B", "a_b"),
                                                             ("A' vs B", "aprime_b")))]


def translation_figure(images: dict[str, np.ndarray], n: int, workdir) -> str:
  """A / A' / B / |A - B| / |A' - B| center crops of n slices; the path from `workdir`."""
  n = max(1, min(n, len(images["A"])))
  size = images["A"].shape[1]
  crop = min(size, max(32, size // 2))
  lo = (size - crop) // 2
  cut = lambda x: x[:n, lo:lo + crop, lo:lo + crop]
  rows = [cut(images["A"]), cut(images["A_prime"]), cut(images["B"]),
          cut(np.abs(images["A"] - images["B"])), cut(np.abs(images["A_prime"] - images["B"]))]
  titles = [t for t in ("A", "A'", "B", "|A-B|", "|A'-B|") for _ in range(n)]
  path = fig_lib.image_grid(np.concatenate(rows), pathlib.Path(workdir) / "figures" /
                            "translate.png", nrow=n, titles=titles)
  return os.path.relpath(path, workdir)
