"""The LTDiff++ benchmark workloads: the PyTorch reference of the concat-conditioned
denoiser computes the JAX one, its Adam + EMA step, the parameter-count check, and the
``radiomics`` rows at quick size (the whole suite run, `python -m benchmarks.run --quick
--only ltdiff_ddpm,radiomics`, is a command, not a test: it compiles the step for ~1 min).

No timing asserts (DESIGN.md). Torch-dependent tests skip without the ``[bench]`` extra.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks.workloads import ltdiff  # noqa: E402
from benchmarks.workloads.common import Options  # noqa: E402
from medrep_jax.eval import radiomics  # noqa: E402
from medrep_jax.methods import load_method  # noqa: E402

QUICK = Options(suite="quick", torch_threads="1")


@pytest.fixture(scope="module")
def denoiser():
  """(flax denoiser of the quick config, random params, z_a, z_b, t): every leaf random,
  so the zero-initialized layers matter."""
  c, batch = ltdiff.ddpm_setup(QUICK)
  model = load_method(c).model  # built from data_info: no ae run
  z_a, z_b = (jnp.asarray(batch[k][:2]) for k in ("z_a", "z_b"))
  t = jnp.array([3, 40], jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), z_b, t, concat=z_a))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
  return model, params, z_a, z_b, t


def _nchw(torch, x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def test_latent_shape_is_the_ae_latent():
  assert ltdiff.latent_shape("tiny") == (8, 4)
  assert ltdiff.latent_shape("small") == ltdiff.latent_shape("paper") == (16, 4)


def test_torch_concat_unet_computes_the_jax_denoiser(torch, denoiser):
  from benchmarks.torch_ref import diffusion_unet as ref
  model, params, z_a, z_b, t = denoiser
  assert model.concat_channels == z_a.shape[-1] == 4
  net = ref.unet_from_flax(model, z_b.shape[-1])
  assert ref.count_params(net) == sum(p.size for p in jax.tree.leaves(params))
  want = np.asarray(jax.jit(lambda v, x, t, c: model.apply(v, x, t, concat=c))(
      params, z_b, t, z_a))
  ref.load_flax_params(net, params["params"])
  with torch.no_grad():
    got = net(_nchw(torch, z_b), torch.from_numpy(np.array(t)), _nchw(torch, z_a))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="concat"):
    net(_nchw(torch, z_b), torch.from_numpy(np.array(t)))


def test_torch_step_with_cond_adam_and_ema(torch, denoiser):
  from benchmarks.torch_ref import diffusion_unet as ref
  torch.manual_seed(0)
  model, _, z_a, z_b, t = denoiser
  net = ref.unet_from_flax(model, z_b.shape[-1])
  step = ref.DDPMTrainStep(net, lr=1e-3, weight_decay=0.0, num_timesteps=50,
                           optimizer="adam", ema_decay=0.9)
  assert isinstance(step.optimizer, torch.optim.Adam)
  x0, cond, tt = _nchw(torch, z_b), _nchw(torch, z_a), torch.from_numpy(np.array(t))
  noise = torch.randn_like(x0)
  losses = [float(step(x0, tt, noise, cond=cond))]
  assert losses[0] == pytest.approx(float(noise.pow(2).mean()), rel=1e-5)  # zero-init out
  for e, p in zip(step.ema, step.params):  # bias-corrected: update 1 copies the params
    torch.testing.assert_close(e, p.detach(), atol=1e-6, rtol=1e-5)
  before = [e.clone() for e in step.ema]
  losses.append(float(step(x0, tt, noise, cond=cond)))
  for e, b, p in zip(step.ema, before, step.params):  # update 2: weight 0.1 / (1 - 0.9^2)
    torch.testing.assert_close(e, b + (0.1 / 0.19) * (p.detach() - b), atol=1e-6, rtol=1e-5)
  losses += [float(step(x0, tt, noise, cond=cond)) for _ in range(6)]
  assert losses[-1] < losses[0]


def test_torch_factory_checks_the_parameter_count(torch, denoiser):
  del torch
  model, params = denoiser[:2]
  c, batch = ltdiff.ddpm_setup(QUICK)
  n_jax = sum(p.size for p in jax.tree.leaves(params))
  loss = ltdiff.ddpm_factory(c, model, n_jax, batch)(False, False, False)()
  assert np.isfinite(float(loss))
  with pytest.raises(RuntimeError, match="parameters"):
    ltdiff.ddpm_factory(c, model, n_jax + 1, batch)(False, False, False)


def test_radiomics_quick_rows():
  rows = ltdiff.run_radiomics(QUICK)
  whole, per_feature, *parts = rows
  n = whole["n_features"]
  (image,) = ltdiff.ct_slices(32, 1, seed=0)
  assert -1000 <= image.min() < image.max() <= 1000
  assert n == len(radiomics.extract(image, ltdiff.disk_mask(32), n_bins=32, lo=-1000, hi=1000))
  assert whole["features_per_sec"] == pytest.approx(n * whole["examples_per_sec"])
  assert per_feature["examples_per_sec"] == pytest.approx(whole["features_per_sec"])
  assert [r["part"] for r in parts] == [*radiomics.CLASSES, "discretise"]
  assert all(r["step_s"] > 0 and r["image"] == 32 for r in rows)
