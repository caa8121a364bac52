"""Tests for DRFL's model pieces: CBAM/PFAM blocks, WMAL/RFTL/RFTM and the network.

Compiling a random initializer costs ~50 ms per parameter on XLA:CPU, so the network
tests build parameters from ``jax.eval_shape`` shapes with NumPy (``_fake_variables``)
and trace every switch combination with ``eval_shape``; two variants are compiled and run.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.models import attention_blocks as ab
from medrep_jax.models import drfl, rftm

SMALL = dict(widths=(8, 16, 32, 64), hidden=32, heads=4, mlp_dim=64, num_layers=1,
             patch_size=4, fusion_width=16)  # 64 px: encoder to 4x4, RFTM 8x8 = 64 tokens


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _fake_variables(model, *args, **kw):
  """Variables of ``model.init(key, *args, **kw)`` filled by NumPy (no compiled init)."""
  shapes = jax.eval_shape(lambda: model.init(_key(), *args, **kw))
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = getattr(path[-1], "key", "")
    if name in ("scale", "var"):
      return jnp.ones(s.shape, s.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(s.shape, s.dtype)
    if name.startswith("gate_"):
      return jnp.full(s.shape, 0.1, s.dtype)
    if name == "negative_slope":
      return jnp.full(s.shape, 0.25, s.dtype)
    fan_in = max(math.prod(s.shape[:-1]), 1)
    return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _count(tree):
  return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------- CBAM / PFAM blocks
@pytest.mark.parametrize("cls,map_shape", [
    (ab.ChannelAttention, (2, 1, 1, 32)),
    (ab.SpatialAttention, (2, 8, 8, 1)),
    (ab.PeakSpatialAttention, (2, 8, 8, 1)),
])
def test_attention_maps_in_unit_interval(cls, map_shape):
  x = _normal(0, (2, 8, 8, 32))
  mod = cls()
  v = mod.init(_key(), x)
  out, m = mod.apply(v, x, return_map=True)
  assert out.shape == x.shape and m.shape == map_shape and m.dtype == jnp.float32
  assert float(m.min()) >= 0 and float(m.max()) <= 1
  np.testing.assert_allclose(out, x * m, rtol=1e-5, atol=1e-6)  # F * map


def test_pfa_matches_eq_14_15():
  """PFA = sigmoid(Conv(Concat(Conv(F - mean_c F), mean_c F))) against a direct lax conv."""
  x = _normal(1, (1, 6, 6, 4))
  mod = ab.PeakSpatialAttention()
  v = mod.init(_key(), x)
  _, m = mod.apply(v, x, return_map=True)
  conv = lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  avg = x.mean(-1, keepdims=True)
  peak = conv(x - avg, v["params"]["peak_conv"]["kernel"])               # eq. 14
  ref = jax.nn.sigmoid(conv(jnp.concatenate([peak, avg], -1),
                            v["params"]["fuse_conv"]["kernel"]))         # eq. 15
  np.testing.assert_allclose(m, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,keys", [
    ("none", set()), ("cbam", {"channel", "spatial"}), ("pfam", {"channel", "spatial"})])
def test_pfam_block_kinds(attention, keys):
  x = _normal(2, (2, 8, 8, 16))
  block = ab.PFAMBlock(features=32, attention=attention, norm="group")
  v = block.init(_key(), x, train=False)
  out, maps = block.apply(v, x, train=False, return_maps=True)
  assert out.shape == (2, 8, 8, 32) and set(maps) == keys
  assert float(out.min()) >= 0  # ReLU after the residual sum
  for m in maps.values():
    assert float(m.min()) >= 0 and float(m.max()) <= 1
  spatial = {"none": None, "cbam": "spatial", "pfam": "pfa"}[attention]
  assert (spatial in v["params"]) if spatial else "channel" not in v["params"]
  with pytest.raises(ValueError, match="attention must be one of"):
    ab.PFAMBlock(attention="se").init(_key(), x, train=False)


# ---------------------------------------------------------------- WMAL / RFTL / RFTM
def test_wmal_reference_rows_and_gates():
  x, ctx = _normal(3, (2, 10, 16)), _normal(4, (2, 6, 16))
  wmal = rftm.WeightedMultiHeadAttention(num_heads=4)
  v = wmal.init(_key(), x, ctx)
  out, w = wmal.apply(v, x, ctx, return_attention=True)
  assert out.shape == (2, 10, 16) and w.shape == (2, 4, 10, 6)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  # NumPy reference with the gates sigmoid(0.1) on Q, K and V.
  p = jax.tree.map(np.asarray, v["params"])
  g = 1 / (1 + np.exp(-0.1))
  proj = lambda a, n: np.einsum("bld,dhk->blhk", a, p[n]["kernel"]) + p[n]["bias"]
  q, k, val = g * proj(x, "query"), g * proj(ctx, "key"), g * proj(ctx, "value")
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
  ref_w = np.exp(logits - logits.max(-1, keepdims=True))
  ref_w /= ref_w.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", ref_w, val)
  ref = np.einsum("bqhd,hdo->bqo", o, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(w, ref_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  # The gates change the output: g_v scales it, g_q/g_k the attention sharpness.
  for gate in ("gate_v", "gate_q"):
    params = {**v["params"], gate: jnp.float32(2.0)}
    out2, w2 = wmal.apply({"params": params}, x, ctx, return_attention=True)
    assert not np.allclose(out, out2, atol=1e-4)
    if gate == "gate_q":
      assert not np.allclose(w, w2, atol=1e-4)
  # Constant gates (the authors' code): no gate parameters, same function at init.
  fixed = rftm.WeightedMultiHeadAttention(num_heads=4, train_gates=False)
  fixed_params = {n: a for n, a in v["params"].items() if not n.startswith("gate_")}
  np.testing.assert_allclose(fixed.apply({"params": fixed_params}, x, ctx), out,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="counts must match"):
    rftm.WeightedMultiHeadAttention(num_heads=4, key_source="query").init(_key(), x, ctx)


def test_wmal_self_attention_and_sow():
  x = _normal(5, (2, 9, 16))
  wmal = rftm.WeightedMultiHeadAttention(num_heads=2)
  v = wmal.init(_key(), x)
  out, state = wmal.apply(v, x, mutable=["intermediates"])
  (w,) = state["intermediates"]["attention_weights"]
  assert w.shape == (2, 2, 9, 9)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, wmal.apply(v, x), rtol=1e-5, atol=1e-6)  # fused path


def test_patchify_unpatchify_round_trip():
  x = _normal(6, (2, 8, 12, 3))
  tokens = rftm.patchify(x, 4)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(tokens[:, 1], x[:, :4, 4:8].reshape(2, -1))  # row-major
  np.testing.assert_array_equal(rftm.unpatchify(tokens, 4, (8, 12)), x)
  with pytest.raises(ValueError, match="does not divide"):
    rftm.patchify(x, 5)


@pytest.mark.parametrize("kernel", [3, 1])
def test_dilated_residual_receptive_field(kernel):
  """A one-pixel impulse spreads to offsets {0, +-6} and {0, +-12} (rates 6 and 12)."""
  x = jnp.zeros((1, 31, 31, 1)).at[0, 15, 15, 0].set(1.0)
  mod = rftm.DilatedResidual(dilations=(6, 12), kernel=kernel)
  v = mod.init(_key(), x)
  v = jax.tree.map(lambda a: jnp.ones_like(a) if a.ndim == 4 else jnp.zeros_like(a), v)
  out = np.asarray(mod.apply(v, x))[0, :, :, 0]
  got = {(int(i) - 15, int(j) - 15) for i, j in zip(*np.nonzero(out))}
  if kernel == 3:
    want = {(a * r, b * r) for r in (6, 12) for a in (-1, 0, 1) for b in (-1, 0, 1)}
  else:  # the authors' 1x1 "dilated" convs: no spread
    want = {(0, 0)}
  assert got == want
  assert out[15, 15] == 2.0  # both branches see the centre tap


def test_rftm_shapes_and_eq_9_input():
  f_seg, f_sr = _normal(7, (2, 16, 16, 8)), _normal(8, (2, 16, 16, 8))
  kw = dict(hidden=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=4)
  module = rftm.RFTM(**kw)
  v = _fake_variables(module, f_seg, f_sr)
  assert v["params"]["rftl_seg"]["patch_pos_embed"].shape == (1, 16, 32)
  assert "context_embed" in v["params"]["rftl_fusion"]
  fused, att = jax.jit(lambda v: module.apply(v, f_seg, f_sr, return_attention=True))(v)
  assert fused.shape == (2, 16, 16, 16)
  assert len(att["seg"]) == len(att["sr"]) == len(att["fusion"]) == 2  # per layer
  assert att["h_fusion"].shape == f_sr.shape and att["fusion"][0].shape == (2, 4, 16, 16)
  np.testing.assert_allclose(att["fusion"][1].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(fused[..., :8], att["h_fusion"] * f_sr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused[..., 8:], f_seg)  # eq. 9: Concat(H_fusion * F_sr, F_seg)
  code = rftm.RFTM(**kw, cross_keys="sr", train_gates=False, dilated_kernel=1)
  shapes = jax.eval_shape(lambda: code.init_with_output(_key(), f_seg, f_sr))
  assert shapes[0].shape == fused.shape
  assert "gate_q" not in shapes[1]["params"]["rftl_fusion"]["wmal0"]


# ---------------------------------------------------------------- DRFL network
def _combos():
  for sr, rf, fu, share in itertools.product([False, True], repeat=4):
    if sr or not (rf or fu or share):
      yield dict(sr_stream=sr, rftm=rf, fusion=fu, share_decoder=share)


def test_every_switch_combination_builds():
  """All valid switch combinations trace (init + apply) on 64 x 64; bad ones fail.

  Also: ``share_decoder=True`` has fewer parameters, and bfloat16 compute keeps float32
  parameters and outputs.
  """
  x = jnp.zeros((2, 64, 64, 1))
  combos = [dict(c, attention="pfam") for c in _combos()]
  combos += [dict(attention="none"), dict(attention="cbam"), dict(dtype=jnp.bfloat16)]
  counts = {}
  for switches in combos:
    model = drfl.DRFL(**SMALL, **switches)
    out, v = jax.eval_shape(lambda m=model: m.init_with_output(_key(), x, train=False))
    assert out["p_bin"].shape == (2, 64, 64, 1), switches
    assert ("p_sr" in out) == model.sr_stream and ("p_fusion" in out) == model.fusion
    if model.sr_stream:
      assert out["p_sr"].shape == (2, 128, 128, 1)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((out, v["params"])))
    assert ("sr_decoder" in v["params"]) == (model.sr_stream and not model.share_decoder)
    counts[tuple(sorted(switches.items(), key=str))] = _count(v["params"])
  full = dict(sr_stream=True, rftm=True, fusion=True, attention="pfam")
  key = lambda share: tuple(sorted(dict(full, share_decoder=share).items(), key=str))
  assert counts[key(True)] < counts[key(False)]
  for bad in (dict(sr_stream=False), dict(sr_stream=False, fusion=False)):
    with pytest.raises(ValueError, match="need the SR stream"):
      drfl.DRFL(**SMALL, **bad).init(_key(), x, train=False)
  with pytest.raises(ValueError, match="multiple of 16"):
    drfl.DRFL(**SMALL).init(_key(), jnp.zeros((1, 72, 72, 1)), train=False)


def test_drfl_runs_train_and_eval():
  """The full DRFL: p_sr exactly 2x, in [0, 1]; dropout draws; WMAL weights sown."""
  x = jax.random.uniform(_key(1), (2, 64, 64, 3))
  model = drfl.DRFL(**SMALL)
  v = _fake_variables(model, x, train=False)
  step = jax.jit(lambda v, x, k: model.apply(
      v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats", "intermediates"]))
  out, state = step(v, x, _key(2))
  assert out["p_bin"].shape == (2, 64, 64, 1) and out["p_fusion"].shape == (2, 64, 64, 1)
  assert out["p_sr"].shape == (2, 128, 128, 3)  # exactly 2x the input, C = input channels
  assert all(a.dtype == jnp.float32 and bool(jnp.isfinite(a).all()) for a in out.values())
  assert float(out["p_sr"].min()) >= 0 and float(out["p_sr"].max()) <= 1
  out2, _ = step(v, x, _key(3))
  assert not np.allclose(out["p_bin"], out2["p_bin"])  # decoder dropout 0.5 is on
  w = state["intermediates"]["rftm"]["rftl_fusion"]["wmal0"]["attention_weights"][0]
  assert w.shape == (2, 4, 64, 64)  # 8 x 8 tokens of the 32 x 32 map, patch 4
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  assert set(state["batch_stats"]["encoder"]) == {"level1", "level2", "level3"}


def test_segmentation_stream_only_runs():
  x = jax.random.uniform(_key(4), (1, 64, 64, 1))
  model = drfl.DRFL(**SMALL, sr_stream=False, rftm=False, fusion=False, attention="none",
                    norm="group")
  v = _fake_variables(model, x, train=False)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  assert set(out) == {"p_bin"} and out["p_bin"].shape == (1, 64, 64, 1)
  assert "batch_stats" not in v


def test_sr_teacher_is_bicubic_at_init_and_doubles():
  x = jax.random.uniform(_key(5), (2, 12, 16, 3))
  teacher = drfl.SRTeacher(features=8, num_blocks=1)
  v = teacher.init(_key(), x)
  y = teacher.apply(v, x)
  assert y.shape == (2, 24, 32, 3) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, jax.image.resize(x, (2, 24, 32, 3), "bicubic"), atol=1e-6)
  x1 = jnp.arange(2 * 2 * 8, dtype=jnp.float32).reshape(1, 2, 2, 8)
  shuffled = drfl.pixel_shuffle(x1, 2)
  assert shuffled.shape == (1, 4, 4, 2)
  np.testing.assert_array_equal(shuffled[0, :2, :2].reshape(-1), x1[0, 0, 0])


def test_max_gather_is_the_max_with_a_one_hot_gradient():
  """The attention pools' max: equal to jnp.max, and its gradient goes to the arg-max
  element only (no division by a tie count, which gave NaN under jit)."""
  from medrep_jax.models.attention_blocks import max_gather
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
  np.testing.assert_array_equal(max_gather(x, 1), jnp.max(x, 1, keepdims=True))
  grad = jax.jit(jax.grad(lambda v: max_gather(v, 1).sum()))(x)
  want = (x == jnp.max(x, 1, keepdims=True)).astype(jnp.float32)
  np.testing.assert_array_equal(grad, want)
  ties = jnp.zeros((1, 4, 2))
  assert float(jax.grad(lambda v: max_gather(v, 1).sum())(ties).sum()) == 2.0
