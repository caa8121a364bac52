"""config.dtype (bf16 compute, fp32 params/losses/norm statistics) and config.remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.data import loader
from medrep_jax.models import diffusion_unet, resnet
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.train import trainer

from conftest import config_module

dcl_cstp_config = config_module("dcl_cstp").dcl_cstp_config
finetune_config = config_module("finetune").finetune_config


def _train(config, tmp_path, steps: int):
  """`steps` real train steps of the trainer's compiled step on one fixed batch."""
  t = trainer.Trainer(config, tmp_path, devices=jax.devices()[:1])
  ds = loader.train_dataset(t.method.make_source("train"), t.method.transforms("train"),
                            global_batch=config.train.batch_size, seed=0)
  with jax.set_mesh(t.mesh):
    batch = mesh_lib.to_global(ds[0], t.mesh)
    state = t.build_state(batch)
    step = t._compile_step()
    losses = []
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return state, np.array(losses), metrics


def _finetune(dtype: str):
  c = finetune_config(task="classification", data="phantoms", size="tiny")
  c.data.num_examples = 32
  c.train.batch_size = 16
  c.optim.lr = 1e-2
  c.dtype = dtype
  return c


def test_bf16_finetune_matches_fp32_for_a_few_steps(tmp_path):
  s32, l32, _ = _train(_finetune("float32"), tmp_path / "f32", steps=6)
  s16, l16, m16 = _train(_finetune("bfloat16"), tmp_path / "bf16", steps=6)
  assert l32[-1] < l32[0]  # it trains
  np.testing.assert_allclose(l16, l32, rtol=0.05, atol=0.02)
  # Parameters, optimizer state, BN statistics and the loss stay float32.
  for leaf in jax.tree.leaves((s16.params, s16.opt_state, s16.model_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert m16["loss"].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(s16.params), jax.tree.leaves(s32.params)):
    np.testing.assert_allclose(a, b, atol=0.03)


@pytest.mark.slow
def test_bf16_dual_stream_step_keeps_fp32_state(tmp_path):
  c = dcl_cstp_config(data="phantoms", size="tiny")
  c.data.num_examples = 32
  c.dtype = "bfloat16"
  state, losses, metrics = _train(c, tmp_path, steps=2)
  assert np.isfinite(losses).all()
  for leaf in jax.tree.leaves((state.params, state.extras)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32  # incl. momentum params and the memory bank
  assert all(v.dtype == jnp.float32 for v in metrics.values())


def _grads(model, variables, *args, **kw):
  def loss(params):
    out = model.apply({**variables, "params": params}, *args, **kw,
                      mutable=["batch_stats"] if "batch_stats" in variables else False)
    out = out[0] if isinstance(out, tuple) else out
    leaves = jax.tree.leaves(out)
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in leaves)
  return jax.jit(jax.grad(loss))(variables["params"])


def test_remat_resnet_same_params_and_gradients():
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  plain = resnet.resnet_tiny(small_input=True)
  remat = resnet.resnet_tiny(small_input=True, remat=True)
  v = plain.init(jax.random.key(1), x, train=True)
  v_r = remat.init(jax.random.key(1), x, train=True)
  assert jax.tree.structure(v) == jax.tree.structure(v_r)
  g = _grads(plain, v, x, train=True)
  g_r = _grads(remat, v, x, train=True)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_diffusion_unet_same_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t = jnp.array([3, 500])
  plain = diffusion_unet.get_diffusion_unet("tiny", 3)
  remat = diffusion_unet.get_diffusion_unet("tiny", 3, remat=True)
  v = plain.init(jax.random.key(1), x, t)
  g = _grads(plain, v, x, t, train=True)
  g_r = _grads(remat, v, x, t, train=True)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
