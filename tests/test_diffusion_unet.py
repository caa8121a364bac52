"""Tests for medrep_jax.models.diffusion_unet (+ attention, conditioning).

Compiles are the cost on CPU, so one fully conditioned tiny model is
initialized once (module fixture) and one jitted apply serves every
"output depends on X" check; shapes, dtypes and errors use jax.eval_shape.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medrep_jax.models import attention as attn_lib
from medrep_jax.models import conditioning
from medrep_jax.models import diffusion_unet as du

B, HW, C = 4, 8, 3
K_MASK, CTX_DIM, CTX_LEN, REF_DIM, CAT_C, NUM_CLASSES = 4, 8, 5, 12, 2, 3
FULL_KW = dict(learned_variance=True, num_classes=NUM_CLASSES,
               spade_channels=K_MASK, context_dim=CTX_DIM,
               ref_embed_dim=REF_DIM, concat_channels=CAT_C)


def _key(seed=0):
  # rbg keys: XLA:CPU compiles threefry-based init programs much slower.
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  # NumPy data: eager jax.random calls would compile threefry (~2 s on CPU).
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _conds(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.eye(K_MASK, dtype=np.float32)[rng.integers(0, K_MASK, (B, HW, HW))]
  return dict(y=jnp.array([0, 1, 2, 0], jnp.int32), spatial_cond=jnp.asarray(mask),
              context=_normal(seed + 1, (B, CTX_LEN, CTX_DIM)),
              ref_embed=_normal(seed + 2, (B, REF_DIM)),
              concat=_normal(seed + 3, (B, HW, HW, CAT_C)))


def _shape_of(model, x_shape, **conds):
  """(variables, output) ShapeDtypeStructs from init_with_output, no compile."""
  out, variables = jax.eval_shape(
      lambda: model.init_with_output(_key(), jnp.zeros(x_shape), jnp.zeros(x_shape[:1]),
                                     **conds))
  return variables, out


@pytest.fixture(scope="module")
def full():
  """Tiny model with every conditioning enabled, its fresh params and inputs.

  Attention only in the middle block: XLA:CPU compile time of ``init`` grows
  with the number of random initializers (~0.1 s each).
  """
  model = du.get_diffusion_unet("tiny", C, attention_resolutions=(), **FULL_KW)
  x, t, conds = _normal(0, (B, HW, HW, C)), jnp.array([3, 700, 250, 999]), _conds()
  params = jax.jit(lambda: model.init(_key(), x, t, **conds))()["params"]
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, **c))
  rng = np.random.default_rng(123)
  perturbed = jax.tree_util.tree_map(
      lambda p: p + 0.2 * jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  return dict(model=model, params=params, perturbed=perturbed, apply=apply,
              x=x, t=t, conds=conds)


def test_zero_init_output_is_zero_then_nonzero_after_perturbation(full):
  out = full["apply"](full["params"], full["x"], full["t"], full["conds"])
  assert out.shape == (B, HW, HW, 2 * C) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  out = full["apply"](full["perturbed"], full["x"], full["t"], full["conds"])
  assert np.all(np.isfinite(out)) and float(jnp.abs(out).min()) > 0.0


@pytest.mark.parametrize("arg", ["t", "y_null", "spatial_cond", "spatial_cond_null",
                                 "context", "ref_embed", "concat", "x"])
def test_output_depends_on_each_input(full, arg):
  x, t, conds = full["x"], full["t"], dict(full["conds"])
  base = full["apply"](full["perturbed"], x, t, conds)
  other = _conds(seed=10)
  if arg == "t":
    t = jnp.array([500, 50, 900, 0])
  elif arg == "x":
    x = x + 1.0
  elif arg == "y_null":
    conds["y"] = jnp.full((B,), NUM_CLASSES, jnp.int32)  # Null label row.
  elif arg == "spatial_cond_null":
    conds["spatial_cond"] = jnp.zeros_like(conds["spatial_cond"])
  else:
    conds[arg] = other[arg]
  out = full["apply"](full["perturbed"], x, t, conds)
  per_example = jnp.abs(out - base).max(axis=(1, 2, 3))
  assert float(per_example.min()) > 1e-4, (arg, per_example)


def _flat(params):
  return {"/".join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_fresh_params_are_float32_with_zero_init_output_layers(full):
  flat = _flat(full["params"])
  assert {v.dtype for v in flat.values()} == {jnp.dtype(jnp.float32)}
  zero = [p for p in flat if p.endswith(("conv_out/kernel", "out/kernel"))
          or p.startswith("out_conv/")]
  assert len(zero) > 10
  for p in zero:
    np.testing.assert_array_equal(np.asarray(flat[p]), 0.0, err_msg=p)


def test_param_tree_layout():
  variables, _ = _shape_of(du.get_diffusion_unet("tiny", C, **FULL_KW),
                           (B, HW, HW, C), **_conds())
  params = variables["params"]
  flat = _flat(params)
  spade = {p.split("/")[0] for p in flat if "/spade_" in p}
  up_blocks = {k for k in params if k.startswith("up_") and k[-1].isdigit()}
  assert spade == up_blocks and spade  # SPADE in every up ResBlock, nowhere else.
  assert not any("/norm_in" in p or "/norm_out" in p for p in flat if p.startswith("up_"))
  assert params["label_embed"]["embedding"].shape[0] == NUM_CLASSES + 1
  # One Psi_FC for ds=2 (4x4 map at 8 px), h*w tokens of width ref_token_dim=16.
  assert [k for k in params if k.startswith("ref_fc")] == ["ref_fc_ds2"]
  assert params["ref_fc_ds2"]["fc"]["kernel"].shape == (REF_DIM, 4 * 4 * 16)
  for suffix in ("_attn", "_xattn", "_ref_xattn"):
    assert {f"mid{suffix}", f"down_1_0{suffix}", f"up_1_1{suffix}"} <= set(params)
    assert f"down_0_0{suffix}" not in params  # ds=1 has no attention in tiny.
  assert params["mid_xattn"]["key_value"]["kernel"].shape == (CTX_DIM, 2, 2, 16)


@pytest.mark.parametrize("kw,conds", [
    ({}, {}),
    (dict(num_classes=5), dict(y=jnp.zeros((B,), jnp.int32))),
    (dict(spade_channels=3), dict(spatial_cond=jnp.zeros((B, 4, 4, 3)))),
    (dict(context_dim=6), dict(context=jnp.zeros((B, 7, 6)))),
    (dict(ref_embed_dim=10, ref_num_tokens=3), dict(ref_embed=jnp.zeros((B, 10)))),
    (dict(concat_channels=4), dict(concat=jnp.zeros((B, 16, 16, 4)))),
    (dict(resblock_updown=True, use_scale_shift_norm=False, spade_channels=2),
     dict(spatial_cond=jnp.zeros((B, 16, 16, 2)))),
])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_output_shapes_per_conditioning_mode(kw, conds, learned_variance):
  model = du.get_diffusion_unet("tiny", C, learned_variance=learned_variance, **kw)
  _, out = _shape_of(model, (B, 16, 16, C), **conds)
  assert out.shape == (B, 16, 16, C * (2 if learned_variance else 1))
  assert out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params_and_output():
  model = du.get_diffusion_unet("tiny", C, dtype=jnp.bfloat16, **FULL_KW)
  variables, out = _shape_of(model, (B, HW, HW, C), **_conds())
  assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert out.dtype == jnp.float32


def test_bfloat16_forward_matches_float32(full):
  model16 = full["model"].clone(dtype=jnp.bfloat16)
  out16 = jax.jit(lambda p: model16.apply({"params": p}, full["x"], full["t"],
                                          **full["conds"]))(full["perturbed"])
  out32 = full["apply"](full["perturbed"], full["x"], full["t"], full["conds"])
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.03, rel


def test_dropout_in_training_needs_and_uses_dropout_rng():
  model = du.get_diffusion_unet("tiny", C, dropout=0.1)
  variables, _ = _shape_of(model, (B, HW, HW, C))
  x, t = jnp.zeros((B, HW, HW, C)), jnp.zeros((B,))
  out = jax.eval_shape(lambda v: model.apply(v, x, t, train=True,
                                             rngs={"dropout": _key(1)}), variables)
  assert out.shape == (B, HW, HW, C)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: model.apply(v, x, t, train=True), variables)


def test_ldm_preset_shapes():
  model = du.get_diffusion_unet("ldm", 3)
  variables, out = _shape_of(model, (1, 64, 64, 3))
  assert out.shape == (1, 64, 64, 3)
  assert {"down_1_0_attn", "down_2_0_attn", "down_3_0_attn"} <= set(variables["params"])
  assert "down_0_0_attn" not in variables["params"]
  with pytest.raises(ValueError, match="tiny"):
    du.diffusion_unet_config("huge")


def test_return_features_gives_decoder_blocks_in_order():
  model = du.get_diffusion_unet("small", C)  # 3 levels, 2 ResBlocks -> 9 up blocks.
  out, variables = jax.eval_shape(lambda: model.init_with_output(
      _key(), jnp.zeros((B, 16, 16, C)), jnp.zeros((B,)), return_features=True))
  out, feats = out
  assert out.shape == (B, 16, 16, C)
  assert list(feats) == [f"dec_{i}" for i in range(1, 10)]
  sizes = [f.shape[1] for f in feats.values()]
  widths = [f.shape[-1] for f in feats.values()]
  assert sizes == [4] * 3 + [8] * 3 + [16] * 3
  assert widths == [128] * 3 + [128] * 3 + [64] * 3


@pytest.mark.parametrize("drop,match", [
    ("y", "'y' is missing"), ("spatial_cond", "'spatial_cond' is missing"),
    ("context", "'context' is missing"), ("ref_embed", "'ref_embed' is missing"),
    ("concat", "'concat' is missing")])
def test_missing_conditioning_raises(drop, match):
  model = du.get_diffusion_unet("tiny", C, **FULL_KW)
  conds = _conds()
  del conds[drop]
  with pytest.raises(ValueError, match=match):
    _shape_of(model, (B, HW, HW, C), **conds)


def test_bad_conditioning_inputs_raise():
  plain = du.get_diffusion_unet("tiny", C)
  with pytest.raises(ValueError, match="'y'.*num_classes=0"):
    _shape_of(plain, (B, HW, HW, C), y=jnp.zeros((B,), jnp.int32))
  with pytest.raises(ValueError, match="divisible by 2"):
    _shape_of(plain, (B, 7, 7, C))
  model = du.get_diffusion_unet("tiny", C, context_dim=CTX_DIM)
  with pytest.raises(ValueError, match=r"'context' has shape \(4, 5, 3\), expected \(4, \*, 8\)"):
    _shape_of(model, (B, HW, HW, C), context=jnp.zeros((B, 5, 3)))


def test_attention_weights_sum_to_one_and_match_numpy():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, n, 3, 4)).astype(np.float32) for n in (6, 5, 5))
  # One jit: eager ops would each compile a program (slow on XLA:CPU).
  w, out = jax.jit(lambda q, k, v: (attn_lib.attention_weights(q, k),
                                    attn_lib.attention(q, k, v)))(q, k, v)
  assert w.shape == (2, 3, 6, 5)
  np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-6)
  logits = np.einsum("bqnd,bknd->bnqk", q, k) / 2.0  # sqrt(d) = 2.
  ref = np.exp(logits - logits.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.einsum("bnqk,bknd->bqnd", ref, v),
                             rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_formula():
  t = np.array([0.0, 3.0, 999.0], np.float32)
  e, e7 = jax.jit(lambda t: (conditioning.timestep_embedding(t, 8),
                             conditioning.timestep_embedding(t, 7)))(t)
  e = np.asarray(e)
  freqs = 10_000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(e, np.concatenate([np.cos(t[:, None] * freqs),
                                                np.sin(t[:, None] * freqs)], -1),
                             rtol=1e-5, atol=1e-5)
  assert e7.shape == (3, 7) and np.all(np.asarray(e7)[:, -1] == 0)


def test_tiny_unet_overfits_fixed_batch(full):
  """eps-prediction MSE (LDM eq. 2) on 4 fixed 8x8 images, fixed noise and t."""
  model, conds, t = full["model"], full["conds"], full["t"]
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(B, HW, HW, C)), jnp.float32)
  eps = _normal(5, (B, HW, HW, C))
  alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
  ab = jnp.asarray(alpha_bar, jnp.float32)[:, None, None, None]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps  # q(x_t | x_0).
  tx = optax.adam(3e-3)

  def loss_fn(params):
    out = model.apply({"params": params}, x_t, t, **conds)
    return jnp.mean((out[..., :C] - eps) ** 2)  # eps channels of [eps, v].

  @jax.jit
  def step(params, opt):
    # A Python loop over a jitted step: lax.scan over the UNet's backward
    # pass runs ~30x slower on XLA:CPU at the tests' -O0 backend level.
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  params = full["params"]
  opt = jax.jit(tx.init)(params)
  losses = []
  for _ in range(100):
    params, opt, loss = step(params, opt)
    losses.append(loss)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])
