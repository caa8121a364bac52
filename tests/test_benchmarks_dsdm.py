"""The DSDM benchmark workloads: ``dsdm_step`` and ``dsdm_ddim`` are registered with the
method's config (the quick suite run, ``python -m benchmarks.run --quick --only
dsdm_step,dsdm_ddim``, is a command, not a test: it compiles for ~1 min), and the
PyTorch reference against the JAX generator:
the SPADE + MCAA + learned-variance forward, the hybrid loss and its gradients through
``GeneratorStage.loss_fn`` (same flips, dropped conditions, t and noise), the Adam + EMA
step, and the guided DDIM loop against the JAX sampler on the same x_T.

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

from benchmarks import workloads  # noqa: E402
from benchmarks.workloads import dsdm  # noqa: E402
from benchmarks.workloads.common import Options  # noqa: E402
from medrep_jax import diffusion  # noqa: E402
from medrep_jax.methods import load_method  # noqa: E402
from medrep_jax.methods.dsdm_parts import common  # noqa: E402

QUICK = Options(suite="quick", torch_threads="1")
B = 6


@pytest.fixture(scope="module")
def generator():
  """(GeneratorStage of the quick config, random params, batch on the 8-bit grid with
  pixels at both edges, cond): every leaf random, so the zero-initialized layers matter."""
  c = dsdm.generator_config(QUICK, dsdm.STEP["quick"]["size"], B)
  host = dsdm.synthetic_batch(c, B, seed=0)
  host["image"] = np.round(host["image"] * 255) / 255  # The decoder's bins at t = 0.
  host["image"][0, :3], host["image"][0, -3:] = 0.0, 1.0
  method = load_method(c)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  cond = common.make_cond(True, True, batch["mask"], dsdm.NUM_MASK_CLASSES, batch["ref"])
  shapes = jax.eval_shape(lambda: method.model.init(
      jax.random.key(0), batch["image"], jnp.zeros((B,), jnp.int32),
      spatial_cond=cond["mask"], ref_embed=cond["ref"]))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
  return method, params, batch, cond


def _nchw(torch, x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def _draws(method, key, shape):
  """The flips, condition drops, t and noise ``GeneratorStage.loss_fn`` draws from key for
  images of ``shape``."""
  b = shape[0]
  k_flip, k_drop, k_diff, _ = jax.random.split(key, 4)
  t_key, noise_key = jax.random.split(k_diff)
  return (np.array(jax.random.bernoulli(k_flip, 0.5, (b,))),
          np.array(jax.random.bernoulli(k_drop, float(method.config.p_uncond), (b,))),
          np.array(jax.random.randint(t_key, (b,), 0, method.sched.num_timesteps)),
          np.array(jax.random.normal(noise_key, shape, jnp.float32)))


def test_workloads_are_registered():
  assert {"dsdm_step", "dsdm_ddim"} <= set(workloads.NAMES)
  assert workloads.runner("dsdm_step") is dsdm.run_step
  assert workloads.runner("dsdm_ddim") is dsdm.run_ddim
  c, batch = dsdm.step_setup(Options(suite="cpu"))
  assert batch["image"].shape == (16, 32, 32, 1) and batch["ref"].shape == (16, 512)
  assert int(batch["mask"].max()) == 2 and c.model.spade_mid and c.p_uncond == 0.2
  assert (c.optim.name, c.optim.lr, c.ema_decay) == ("adam", 2e-4, 0.999)
  assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("cosine", 1000)


def test_torch_generator_computes_the_jax_forward(torch, generator):
  from benchmarks.torch_ref import diffusion_unet as ref
  method, params, batch, cond = generator
  model = method.model
  assert model.learned_variance and model.spade_mid and model.ref_embed_dim == 16
  with pytest.raises(ValueError, match="image_size"):
    ref.unet_from_flax(model, 1)
  net = ref.unet_from_flax(model, 1, image_size=16)
  assert ref.count_params(net) == sum(p.size for p in jax.tree.leaves(params))
  assert set(net.ref_fc) == {"2"} and net.mid_0.spade and net.up[0].blocks[0].spade
  x = jnp.asarray(np.random.default_rng(1).standard_normal(batch["image"].shape), jnp.float32)
  t = jnp.array([0, 3, 17, 25, 40, 49], jnp.int32)
  want = np.asarray(jax.jit(common.apply_fn(model))(params, x, t, cond))
  assert want.shape == (B, 16, 16, 2)  # [eps, v]
  ref.load_flax_params(net, params)
  args = (_nchw(torch, x), torch.from_numpy(np.array(t)), None, _nchw(torch, cond["mask"]),
          torch.from_numpy(np.array(cond["ref"])))
  with torch.no_grad():
    got = net(*args)
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="segmap"):
    net(*args[:3], None, args[4])


def test_torch_hybrid_loss_and_gradients_match_the_jax_step(torch, generator):
  """GeneratorStage.loss_fn (hflip, both conditions dropped together, hybrid loss) and
  DSDMTrainStep.loss on the same draws: loss, L_simple, L_vlb and every gradient."""
  from benchmarks.torch_ref import diffusion_unet as ref
  method, params, batch, _ = generator
  # The first key whose draws cover t = 0 (the decoder NLL) and t > 0 (the KL), dropped and
  # kept conditions, flipped and unflipped images.
  for seed in range(200):
    key = jax.random.key(seed)
    flip, drop, t, noise = _draws(method, key, batch["image"].shape)
    if (t == 0).any() and (t > 0).any() and drop.any() and not drop.all() and (
        flip.any() and not flip.all()):
      break
  else:
    pytest.fail("no key covers every case")
  (loss, aux), grads = jax.jit(jax.value_and_grad(
      lambda p: method.loss_fn(p, None, batch, key), has_aux=True))(params)
  net = ref.unet_from_flax(method.model, 1, image_size=16)
  ref.load_flax_params(net, params)
  tables = ref.DiffusionTables(ref.cosine_betas(method.sched.num_timesteps))
  np.testing.assert_allclose(tables.sqrt_ab.numpy(), method.sched.sqrt_alphas_cumprod,
                             rtol=1e-6)
  step = ref.DSDMTrainStep(net, tables, dsdm.NUM_MASK_CLASSES, p_uncond=0.2)
  got, parts = step.loss(_nchw(torch, batch["image"]), torch.from_numpy(np.array(batch["mask"])),
                         torch.from_numpy(np.array(batch["ref"])),
                         t=torch.from_numpy(t).long(), noise=_nchw(torch, noise),
                         flip=torch.from_numpy(flip), drop=torch.from_numpy(drop))
  got.backward()
  m = aux["metrics"]
  assert float(got.detach()) == pytest.approx(float(loss), rel=1e-5)
  assert float(parts["mse"].mean()) == pytest.approx(float(m["mse"]), rel=1e-5)
  assert float(parts["vlb"].mean()) == pytest.approx(float(m["vlb"]), rel=1e-4)
  want_net = ref.unet_from_flax(method.model, 1, image_size=16)
  ref.load_flax_params(want_net, grads)  # JAX gradients in the torch layout.
  want = want_net.state_dict()
  scale = max(float(v.abs().max()) for v in want.values())
  for name, p in net.named_parameters():
    np.testing.assert_allclose(p.grad.numpy(), want[name].numpy(), rtol=1e-3,
                               atol=1e-5 * scale, err_msg=name)


def test_torch_dsdm_step_with_adam_and_ema(torch, generator):
  from benchmarks.torch_ref import diffusion_unet as ref
  torch.manual_seed(0)
  method, _, batch, _ = generator
  net = ref.unet_from_flax(method.model, 1, image_size=16)  # torch init: zero output conv
  tables = ref.DiffusionTables(ref.cosine_betas(method.sched.num_timesteps))
  step = ref.DSDMTrainStep(net, tables, dsdm.NUM_MASK_CLASSES, lr=1e-3, ema_decay=0.9)
  assert isinstance(step.optimizer, torch.optim.Adam)
  image, mask, refs = (torch.from_numpy(np.array(batch[k])) for k in ("image", "mask", "ref"))
  image = image.permute(0, 3, 1, 2).contiguous()
  fixed = dict(t=torch.tensor([0, 5, 10, 20, 30, 49]), noise=torch.randn_like(image),
               flip=torch.tensor([True, False] * 3), drop=torch.tensor([False] * 5 + [True]))
  losses = [float(step(image, mask, refs, **fixed))]
  for e, p in zip(step.ema, step.params):  # bias-corrected: update 1 copies the params
    torch.testing.assert_close(e, p.detach(), atol=1e-6, rtol=1e-5)
  before = [e.clone() for e in step.ema]
  losses.append(float(step(image, mask, refs, **fixed)))
  for e, b, p in zip(step.ema, before, step.params):  # update 2: weight 0.1 / (1 - 0.9^2)
    torch.testing.assert_close(e, b + (0.1 / 0.19) * (p.detach() - b), atol=1e-6, rtol=1e-5)
  losses += [float(step(image, mask, refs, **fixed)) for _ in range(6)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  free = [float(step(image, mask, refs)) for _ in range(2)]  # draws its own t, noise, ...
  assert all(np.isfinite(free))


def test_step_factory_checks_the_parameter_count(torch, generator):
  del torch
  method, params, _, _ = generator
  c, batch = dsdm.step_setup(QUICK)
  n = sum(p.size for p in jax.tree.leaves(params))
  loss = dsdm.step_factory(c, method, lambda: params, n, batch)(False, False, False)()
  assert np.isfinite(float(loss))
  with pytest.raises(RuntimeError, match="parameters"):
    dsdm.step_factory(c, method, lambda: params, n + 1, batch)(False, False, False)


def test_torch_guided_ddim_matches_the_jax_sampler(torch):
  """The workload's pair on the same weights, x_T and conditions; one 2B model call per step;
  and, without the x0 clip (which saturates most pixels of a random model), the raw values."""
  from benchmarks.torch_ref import diffusion_unet as ref
  g = dsdm.GuidedSampling(QUICK)
  assert g.guidance_scale == 3.0 and g.num_steps == 10
  want = np.asarray(g.call())
  got = g.torch_factory()(False, False, False)()
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-4)
  # The guided model call: the same guided eps and conditional v.
  fwd = np.asarray(g.call_forward())
  net = dsdm.torch_unet(g.model, g.params, g.shape[1])
  calls = []
  net.register_forward_hook(lambda _, args, out: calls.append(args[0].shape[0]))
  x, seg = _nchw(torch, g.x_T), _nchw(torch, g.cond["mask"])
  refs = torch.from_numpy(np.array(g.cond["ref"]))
  with torch.no_grad():
    out = net(torch.cat([x, x]), torch.full((2 * g.batch,), int(g.t_mid[0])), None,
              torch.cat([seg, 0 * seg]), torch.cat([refs, 0 * refs]))
  eps_c, eps_u, v_c = out[:g.batch, :1], out[g.batch:, :1], out[:g.batch, 1:]
  guided = torch.cat([eps_c + 3.0 * (eps_c - eps_u), v_c], 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(guided, fwd, atol=1e-4, rtol=1e-4)
  tables = dsdm.torch_tables("cosine", g.sched.num_timesteps)
  sample = diffusion.make_sampler(common.apply_fn(g.model), g.sched, g.shape, sampler="ddim",
                                  num_steps=g.num_steps, eta=0.0, learned_variance=True,
                                  clip_x0=None, guidance_scale=3.0, null_cond=0.0)
  want = np.asarray(sample(g.params, g.rng, g.cond, None, g.x_T))
  calls.clear()
  got = ref.guided_ddim_sample(net, tables, x, seg, refs, num_steps=g.num_steps,
                               guidance_scale=3.0, clip_x0=None)
  assert calls == [2 * g.batch] * g.num_steps
  scale = np.abs(want).max()
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy() / scale, want / scale, atol=1e-5)
