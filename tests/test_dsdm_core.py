"""DSDM (DiffusionDCI, paper 004, Sec. IV-B) properties of the shared diffusion core.

The DSDM method is not built yet; these tests pin what it will reuse:
SPADE (decoder norm), MCAA (eq. 10-11: per-resolution Psi_FC tokens + cross-attention
with a residual), the null condition of classifier-free guidance, CFG itself (eq. 17)
and the learned-range variance of the hybrid loss (eq. 14-16, improved DDPM eq. 15).

One tiny DSDM-shaped UNet (3-class mask by SPADE, 512-d reference by MCAA at two
resolutions, learned variance) is built once per module; every UNet check reuses its
jitted apply so the file compiles only a handful of programs.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax import diffusion as dif
from medrep_jax.models import attention as attn_lib
from medrep_jax.models import conditioning
from medrep_jax.models import diffusion_unet as du
from medrep_jax.models.resnet import group_count

B, HW, C, K_MASK, REF_DIM = 4, 8, 3, 3, 512  # REF_DIM: the ResNet-18 embedding (IV-B2a).
# MCAA blocks of the fixture model: attention at ds=1 (8x8) and in the middle (ds=2, 4x4).
MCAA_BLOCKS = {"down_0_0": 1, "mid": 2, "up_0_0": 1, "up_0_1": 1}


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")  # rbg: threefry init programs compile slowly.


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _one_hot_mask(seed, shape):
  labels = np.random.default_rng(seed).integers(0, K_MASK, shape)
  return jnp.asarray(np.eye(K_MASK, dtype=np.float32)[labels])


def _conds(seed):
  return {"spatial_cond": _one_hot_mask(seed, (B, HW, HW)),
          "ref_embed": _normal(seed + 1, (B, REF_DIM))}


def _np_group_norm(x, groups, eps=1e-5):
  """Float64 GroupNorm without affine parameters, NHWC."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def _perturb(params, seed, scale=0.2):
  """Params plus Gaussian noise, so zero-initialized output layers are not the identity."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)


def _zero_spade_modulation(tree):
  """A copy of `tree` with every SPADE gamma/beta conv (kernel and bias) set to zero."""
  def walk(node):
    return {k: (jax.tree.map(jnp.zeros_like, v) if k in ("gamma", "beta")
                else walk(v) if isinstance(v, dict) else v) for k, v in node.items()}
  return walk(tree)


# ------------------------------------------------------------------ SPADE


class _GroupNorm(nn.Module):
  """The library's GroupNorm (affine, default init: scale 1, bias 0) as a module."""
  max_groups: int

  @nn.compact
  def __call__(self, x):
    return conditioning.group_norm(x, self.max_groups, name="norm")


def test_spade_with_zero_gamma_beta_is_groupnorm():
  """SPADE: GN(x) (1 + gamma(m)) + beta(m) is GN(x) when gamma = beta = 0."""
  x = _normal(0, (2, HW, HW, 8), scale=3.0) + 1.0
  segmap = _one_hot_mask(1, (2, 4, 4))  # Coarser than x: SPADE resizes it (nearest).
  spade = conditioning.SPADE(max_groups=4, hidden=8)
  gn = _GroupNorm(max_groups=4)

  @jax.jit
  def run(x, segmap):
    params = spade.init(_key(), x, segmap)["params"]
    fresh = spade.apply({"params": params}, x, segmap)
    zeroed = spade.apply({"params": _zero_spade_modulation(params)}, x, segmap)
    return fresh, zeroed, gn.apply(gn.init(_key(), x), x)

  fresh, zeroed, library_gn = run(x, segmap)
  want = _np_group_norm(x, 4)
  np.testing.assert_allclose(zeroed, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(zeroed, library_gn, rtol=1e-6, atol=1e-6)
  # The fresh modulation convs are not zero, so the mask does change the output.
  assert float(jnp.abs(fresh - zeroed).max()) > 1e-2


def test_spade_resblock_with_zero_modulation_is_groupnorm_resblock():
  """A SPADE ResBlock with gamma = beta = 0 equals the GroupNorm ResBlock that shares its
  other weights (norm_in/norm_out at scale 1, bias 0): the DSDM -> segmentation-net
  weight transfer (IV-A) drops exactly the SPADE parameters."""
  x, emb = _normal(2, (2, HW, HW, 8)), _normal(3, (2, 32))
  segmap = _one_hot_mask(4, (2, HW, HW))
  spade_block = conditioning.ResBlock(16, max_groups=4, spade_hidden=8)
  gn_block = conditioning.ResBlock(16, max_groups=4)

  @jax.jit
  def run(x, emb, segmap):
    # Perturbed: conv_out is zero-initialized, which would hide the norms.
    params = _perturb(spade_block.init(_key(), x, emb, segmap)["params"], seed=5)
    zeroed = _zero_spade_modulation(params)
    gn_params = {k: v for k, v in zeroed.items() if not k.startswith("spade_")}
    for which, width in (("in", 8), ("out", 16)):
      gn_params[f"norm_{which}"] = {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}
    return (spade_block.apply({"params": params}, x, emb, segmap),
            spade_block.apply({"params": zeroed}, x, emb, segmap),
            gn_block.apply({"params": gn_params}, x, emb))

  modulated, with_spade, with_gn = run(x, emb, segmap)
  assert float(jnp.abs(modulated - with_gn).max()) > 1e-2  # The modulation is seen.
  np.testing.assert_allclose(with_spade, with_gn, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ DSDM-shaped UNet


@pytest.fixture(scope="module")
def dsdm():
  """Tiny DSDM UNet: SPADE mask, 512-d reference by MCAA at ds 1 and 2, learned variance.

  One attention head, so eq. 11's sqrt(C) scale is the head's sqrt(d).
  """
  model = du.get_diffusion_unet("tiny", C, learned_variance=True, spade_channels=K_MASK,
                                ref_embed_dim=REF_DIM, attention_resolutions=(1,),
                                num_heads=1)
  x, t = _normal(0, (B, HW, HW, C)), jnp.array([3, 700, 250, 999])
  # Random weights of the init's shapes, drawn in NumPy: compiling `init` is the slow
  # part on CPU, and fresh zero-initialized output layers would hide every path anyway.
  shapes = jax.eval_shape(lambda: model.init(_key(), x, t, **_conds(0)))["params"]
  rng = np.random.default_rng(123)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.normal(size=s.shape) * 0.2
                                  + (path[-1].key == "scale"), jnp.float32), shapes)
  # One compiled forward serves every B-batch check; `apply` drops the intermediates.
  capture = jax.jit(lambda p, x, t, c: model.apply(
      {"params": p}, x, t, capture_intermediates=True, mutable=["intermediates"], **c))
  apply = lambda p, x, t, c: capture(p, x, t, c)[0]
  return dict(model=model, params=params, apply=apply, capture=capture, x=x, t=t)


def _out(inter, *path):
  """The first captured __call__ output of the submodule at `path`."""
  node = inter
  for name in path:
    node = node[name]
  return np.asarray(node["__call__"][0], np.float64)


def _np_mcaa(x, tokens, block):
  """Eq. 10-11 with the residual, in float64: x + W_o softmax(Q K^T / sqrt(C)) V + b_o with
  Q = W_Q GN(x) (the query-side GroupNorm of the block), K, V = W_K, W_V Psi_FC(F_r)."""
  b, h, w, c = x.shape
  gn = _np_group_norm(x, group_count(c, 32)) * np.asarray(block["norm"]["scale"])
  gn = (gn + np.asarray(block["norm"]["bias"])).reshape(b, h * w, c)
  w_q = np.asarray(block["query"]["kernel"], np.float64).reshape(c, c)
  w_kv = np.asarray(block["key_value"]["kernel"], np.float64)  # (D, 2, heads=1, C)
  w_o = np.asarray(block["out"]["kernel"], np.float64).reshape(c, c)
  q, k, v = gn @ w_q, tokens @ w_kv[:, 0, 0], tokens @ w_kv[:, 1, 0]
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = weights @ v @ w_o + np.asarray(block["out"]["bias"], np.float64)
  return x + out.reshape(x.shape), weights


def test_mcaa_per_resolution_tokens_and_attention_match_eq_10_11(dsdm):
  params = dsdm["params"]
  conds = _conds(0)
  _, state = dsdm["capture"](params, dsdm["x"], dsdm["t"], conds)
  inter = state["intermediates"]
  ref = np.asarray(conds["ref_embed"], np.float64)
  for ds, side in ((1, 8), (2, 4)):  # Psi_FC: 512 -> h*w tokens at each resolution.
    fc = params[f"ref_fc_ds{ds}"]["fc"]
    tokens = _out(inter, f"ref_fc_ds{ds}")
    assert tokens.shape == (B, side * side, 16)
    want = ref @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"])
    np.testing.assert_allclose(tokens.reshape(B, -1), want, rtol=1e-4, atol=1e-4)
  for name, ds in MCAA_BLOCKS.items():
    x_in = _out(inter, f"{name}_attn")  # The MCAA block's input: the self-attention output.
    tokens = _out(inter, f"ref_fc_ds{ds}")
    assert tokens.shape[1] == x_in.shape[1] * x_in.shape[2], name
    want, np_weights = _np_mcaa(x_in, tokens, params[f"{name}_ref_xattn"])
    np.testing.assert_allclose(_out(inter, f"{name}_ref_xattn"), want, rtol=1e-4, atol=1e-4,
                               err_msg=name)
    # The library's softmax on the block's own Q and K: rows sum to 1 over the tokens.
    kv = inter[f"{name}_ref_xattn"]["key_value"]["__call__"][0]
    weights = attn_lib.attention_weights(
        inter[f"{name}_ref_xattn"]["query"]["__call__"][0], kv[:, :, 0])
    assert weights.shape == (B, 1, tokens.shape[1], tokens.shape[1])
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(weights[:, 0], np_weights, rtol=1e-3, atol=1e-5, err_msg=name)


def test_mcaa_output_depends_on_the_reference(dsdm):
  """Changing only F_r leaves the first MCAA block's input unchanged and changes its
  output (and the model's) in every example: the reference enters through MCAA."""
  base = _conds(0)
  other = dict(base, ref_embed=_normal(50, (B, REF_DIM)))
  (out_a, sa), (out_b, sb) = (dsdm["capture"](dsdm["params"], dsdm["x"], dsdm["t"], c)
                              for c in (base, other))
  ia, ib = sa["intermediates"], sb["intermediates"]
  np.testing.assert_array_equal(_out(ia, "down_0_0_attn"), _out(ib, "down_0_0_attn"))
  for name in MCAA_BLOCKS:
    diff = np.abs(_out(ia, f"{name}_ref_xattn") - _out(ib, f"{name}_ref_xattn"))
    assert diff.max(axis=(1, 2, 3)).min() > 1e-4, name
  assert float(jnp.abs(out_a - out_b).max(axis=(1, 2, 3)).min()) > 1e-4


# ------------------------------------------------------------------ null condition, CFG


def test_dropped_conditions_make_the_output_independent_of_mask_and_reference(dsdm):
  """p_uncond path: drop_condition replaces mask and reference together (one shared
  Bernoulli, null = zeros); a dropped example's output is the null output whatever its
  mask and reference were, and a kept example's is the conditional one."""
  apply, params, x, t = dsdm["apply"], dsdm["params"], dsdm["x"], dsdm["t"]
  cond_a, cond_b = _conds(0), _conds(20)
  null = jax.tree.map(jnp.zeros_like, cond_a)
  out_a, out_b, out_null = (apply(params, x, t, c) for c in (cond_a, cond_b, null))
  assert float(jnp.abs(out_a - out_b).max(axis=(1, 2, 3)).min()) > 1e-4  # Can fail.
  drop = jax.jit(dif.drop_condition, static_argnums=(2,))
  dropped_a, mask_a = drop(_key(1), cond_a, 1.0, 0.0)
  dropped_b, _ = drop(_key(2), cond_b, 1.0, 0.0)
  assert bool(mask_a.all())
  np.testing.assert_array_equal(apply(params, x, t, dropped_a), out_null)
  np.testing.assert_array_equal(apply(params, x, t, dropped_b), out_null)
  mixed, mask = drop(_key(3), cond_a, 0.5, 0.0)
  mask = np.asarray(mask)
  assert mask.any() and not mask.all(), mask  # The key gives a mixed batch.
  out = np.asarray(apply(params, x, t, mixed))
  np.testing.assert_allclose(out[mask], np.asarray(out_null)[mask], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[~mask], np.asarray(out_a)[~mask], rtol=1e-5, atol=1e-6)


def test_cfg_scale_zero_is_the_conditional_model_eq_17(dsdm):
  """The library's CFG is eq. 17 as printed: eps^ = eps(x|y) + s (eps(x|y) - eps(x|null))
  (= Ho & Salimans' (1 + w) eps_c - w eps_u with w = s), so s = 0 is eps(x|y). Checked
  through `guided_model_fn` (one 2B-batch call: conditional + null halves) on the DSDM
  UNet; the learned-variance half is always the conditional one."""
  apply, params, x, t = dsdm["apply"], dsdm["params"], dsdm["x"], dsdm["t"]
  cond = _conds(0)

  @jax.jit
  def guided(params, scale):
    model_fn = lambda x, t, c: apply(params, x, t, c)
    return dif.guided_model_fn(model_fn, scale, 0.0, learned_variance=True)(x, t, cond)

  cond_out = np.asarray(apply(params, x, t, cond))
  null_out = np.asarray(apply(params, x, t, jax.tree.map(jnp.zeros_like, cond)))
  assert np.abs(cond_out[..., :C] - null_out[..., :C]).max() > 1e-3  # Guidance matters.
  np.testing.assert_allclose(guided(params, jnp.float32(0.0)), cond_out, rtol=1e-5, atol=1e-5)
  s3 = np.asarray(guided(params, jnp.float32(3.0)))  # The paper's s = 3.
  np.testing.assert_allclose(s3[..., :C], cond_out[..., :C] + 3.0 * (
      cond_out[..., :C] - null_out[..., :C]), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s3[..., C:], cond_out[..., C:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ learned-range variance


def _variance_grid(sched, v):
  """Sigma of p_mean_variance for every schedule index (rows) and every value in v."""
  n = sched.num_timesteps
  xt = jnp.zeros((n, 1, 1, v.size))
  out = jnp.concatenate([xt, jnp.broadcast_to(jnp.asarray(v, jnp.float32), xt.shape)], -1)
  p = jax.jit(lambda s, o: dif.p_mean_variance(s, o, xt, jnp.arange(n),
                                               learned_variance=True))(sched, out)
  return np.asarray(p.variance[:, 0, 0], np.float64), np.asarray(p.log_variance[:, 0, 0])


@pytest.mark.parametrize("steps", [None, 50])  # DSDM's cosine T = 1000, and respaced.
def test_learned_range_variance_stays_in_posterior_to_beta_range(steps):
  """Improved DDPM eq. 15 as the library reads it: log Sigma = f log beta_t + (1 - f)
  log beta~_t with f = (v + 1) / 2, so v in [-1, 1] spans [beta~_t, beta_t] (beta~_0 = 0;
  the log uses beta~_1 there, inside [0, beta_0]); Sigma is monotone in v."""
  sched = dif.make_schedule("cosine", 1000)
  if steps:
    sched, _ = dif.respace(sched, dif.space_timesteps(1000, steps))
  v = np.concatenate([np.linspace(-1.0, 1.0, 9),
                      np.random.default_rng(0).uniform(-1.0, 1.0, 8)])
  var, log_var = _variance_grid(sched, v)
  beta = np.asarray(sched.betas, np.float64)[:, None]
  beta_tilde = np.asarray(sched.posterior_variance, np.float64)[:, None]
  assert np.all(var >= beta_tilde * (1 - 1e-5)) and np.all(var <= beta * (1 + 1e-5))
  frac = (v + 1.0) / 2.0
  log_tilde = np.asarray(sched.posterior_log_variance_clipped, np.float64)[:, None]
  want = np.exp(frac * np.log(beta) + (1.0 - frac) * log_tilde)
  np.testing.assert_allclose(var, want, rtol=1e-5)
  order = np.argsort(v)
  assert np.all(np.diff(log_var[:, order], axis=1) >= -1e-6)


def test_learned_range_is_not_clipped_outside_minus_one_one():
  """v is not constrained (improved DDPM Sec. 3.1: "we did not apply any constraints on
  v"): |v| > 1 extrapolates beyond [beta~_t, beta_t]. Pins that choice."""
  sched = dif.make_schedule("cosine", 1000)
  var, _ = _variance_grid(sched, np.array([-3.0, 3.0]))
  beta = np.asarray(sched.betas, np.float64)
  beta_tilde = np.asarray(sched.posterior_variance, np.float64)
  assert np.all(var[1:, 0] < beta_tilde[1:]) and np.all(var[1:, 1] > beta[1:])
