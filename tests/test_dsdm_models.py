"""Tests for DSDM's DiffusionUNet options: spade_mid, ref_attention_resolutions, fusion.

DSDM (paper 004): SPADE also in the middle ResBlocks (SDM), MCAA at chosen
resolutions, and the segmentation net (Sec. IV-C2) = the same UNet with
GroupNorm, fed the frozen DSDM's decoder features by cross-attention (CAA) or,
in the ablation, a skip connection. Parameter trees come from jax.eval_shape;
random weights are drawn in NumPy (compiling ``init`` is the slow part on CPU).
"""
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.models import attention as attn_lib
from medrep_jax.models import diffusion_unet as du
from medrep_jax.models import feature_fusion

B, HW, C, K_MASK, REF_DIM = 2, 8, 3, 3, 12
FUSED = ("dec_2", "dec_3")  # dec_2: ds 2 (4x4, 32 ch), dec_3: ds 1 (8x8, 16 ch).
FUSED_SHAPES = {"dec_2": (B, 4, 4, 24), "dec_3": (B, 8, 8, 16)}  # C_f may differ.


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _segmap(seed):
  mask = np.random.default_rng(seed).integers(0, K_MASK, (B, HW, HW))
  return jnp.asarray(np.eye(K_MASK, dtype=np.float32)[mask])


def _fused(seed):
  return {n: _normal(seed + i, s) for i, (n, s) in enumerate(FUSED_SHAPES.items())}


def _shapes(model, return_features=False, **conds):
  """(param ShapeDtypeStructs, output) of ``model.init_with_output``, no compile."""
  out, variables = jax.eval_shape(lambda c: model.init_with_output(
      _key(), jnp.zeros((B, HW, HW, C)), jnp.zeros((B,)),
      return_features=return_features, **c), conds)
  return variables["params"], out


def _flat(params):
  return {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(params, sep="/").items()}


def _random(shapes, seed=0):
  """Random float32 params of ``shapes`` (norm scales around 1)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.normal(size=s.shape) * 0.2
                                  + (path[-1].key == "scale"), jnp.float32), shapes)


def _tiny(**kw):
  return du.get_diffusion_unet("tiny", C, **kw)


def test_decoder_block_names_match_return_features():
  assert du.decoder_block_names((1, 2), 1) == ["dec_1", "dec_2", "dec_3", "dec_4"]
  blocks = du.decoder_blocks((1, 2), 1)
  assert [tuple(b) for b in blocks.values()] == [(1, 0, 2), (1, 1, 2), (0, 0, 1),
                                                 (0, 1, 1)]
  assert len(du.decoder_block_names((1, 2, 2, 4), 2)) == 12
  _, (_, feats) = _shapes(_tiny(), return_features=True)
  assert list(feats) == list(blocks)
  for name, block in blocks.items():
    assert feats[name].shape[:3] == (B, HW // block.ds, HW // block.ds), name


def test_defaults_keep_the_parameter_tree():
  conds = dict(spatial_cond=_segmap(0), ref_embed=_normal(0, (B, REF_DIM)))
  kw = dict(spade_channels=K_MASK, ref_embed_dim=REF_DIM)
  base = _flat(_shapes(_tiny(**kw), **conds)[0])
  explicit = _tiny(**kw, spade_mid=False, ref_attention_resolutions=(2,),
                   fusion="none", fusion_blocks=())
  assert _flat(_shapes(explicit, **conds)[0]) == base
  # Without SPADE / MCAA, spade_mid and ref_attention_resolutions are ignored.
  plain = _flat(_shapes(_tiny())[0])
  assert _flat(_shapes(_tiny(spade_mid=True, ref_attention_resolutions=(1,)))[0]) == plain


def test_spade_mid_puts_spade_norms_in_the_middle_resblocks():
  conds = dict(spatial_cond=_segmap(0))
  off = _flat(_shapes(_tiny(spade_channels=K_MASK), **conds)[0])
  on = _flat(_shapes(_tiny(spade_channels=K_MASK, spade_mid=True), **conds)[0])
  only_on, only_off = set(on) - set(off), set(off) - set(on)
  assert {tuple(p.split("/")[:2]) for p in only_on} == {
      (m, f"spade_{w}") for m in ("mid_0", "mid_1") for w in ("in", "out")}
  assert only_off == {f"{m}/norm_{w}/{v}" for m in ("mid_0", "mid_1")
                      for w in ("in", "out") for v in ("scale", "bias")}
  assert all(on[p] == off[p] for p in set(on) & set(off))
  assert on["mid_0/spade_in/gamma/kernel"] == (3, 3, 16, 32)  # spade_hidden 16, C 32.


@pytest.mark.parametrize("spade_mid", [False, True])
def test_spade_mid_feeds_the_segmap_into_the_middle_block(spade_mid):
  model = _tiny(spade_channels=K_MASK, spade_mid=spade_mid)
  params = _random(_shapes(model, spatial_cond=_segmap(0))[0])
  x, t = _normal(1, (B, HW, HW, C)), jnp.array([10, 700])

  @jax.jit
  def mid_out(segmap):
    _, state = model.apply({"params": params}, x, t, spatial_cond=segmap,
                           capture_intermediates=lambda m, _: m.path == ("mid_1",),
                           mutable=["intermediates"])
    return state["intermediates"]["mid_1"]["__call__"][0]

  a, b = mid_out(_segmap(0)), mid_out(_segmap(1))
  diff = np.asarray(jnp.abs(a - b).max(axis=(1, 2, 3)))
  if spade_mid:
    assert diff.min() > 1e-4, diff
  else:
    np.testing.assert_array_equal(diff, 0.0)


@pytest.mark.parametrize("kw,ref,attn,fc", [
    # MCAA at ds 1 (no self-attention there) besides the self-attention at ds 2.
    (dict(ref_attention_resolutions=(1,)),
     {"down_0_0", "up_0_0", "up_0_1", "mid"}, {"down_1_0", "up_1_0", "up_1_1", "mid"},
     {"ref_fc_ds1", "ref_fc_ds2"}),
    # No middle attention: no MCAA in the middle either.
    (dict(ref_attention_resolutions=(1,), mid_attention=False),
     {"down_0_0", "up_0_0", "up_0_1"}, {"down_1_0", "up_1_0", "up_1_1"}, {"ref_fc_ds1"}),
    # MCAA everywhere, self-attention only in the middle.
    (dict(ref_attention_resolutions=(1, 2), attention_resolutions=()),
     {"down_0_0", "down_1_0", "up_0_0", "up_0_1", "up_1_0", "up_1_1", "mid"}, {"mid"},
     {"ref_fc_ds1", "ref_fc_ds2"}),
    # None: the attention resolutions (today's layout).
    (dict(), {"down_1_0", "up_1_0", "up_1_1", "mid"},
     {"down_1_0", "up_1_0", "up_1_1", "mid"}, {"ref_fc_ds2"}),
])
def test_ref_attention_resolutions_place_mcaa_exactly(kw, ref, attn, fc):
  params, out = _shapes(_tiny(ref_embed_dim=REF_DIM, **kw),
                        ref_embed=_normal(0, (B, REF_DIM)))
  assert out.shape == (B, HW, HW, C)
  assert {k[:-len("_ref_xattn")] for k in params if k.endswith("_ref_xattn")} == ref
  assert {k[:-len("_attn")] for k in params
          if k.endswith("_attn") and not k.endswith("_xattn")} == attn
  assert {k for k in params if k.startswith("ref_fc")} == fc
  if "ref_fc_ds1" in fc:  # h*w = 64 tokens of width ref_token_dim = 16.
    assert params["ref_fc_ds1"]["fc"]["kernel"].shape == (REF_DIM, 64 * 16)


def _fusion_params(params):
  return {k: v for k, v in params.items() if k.endswith(("_caa", "_skip"))}


class _FusionLayers(nn.Module):
  """The fusion layers of FUSED alone, as the UNet builds them (cheap to init)."""
  mode: str

  @nn.compact
  def __call__(self, fused):
    for block, dec, width in (("up_1_1", "dec_2", 32), ("up_0_0", "dec_3", 16)):
      h = jnp.zeros(fused[dec].shape[:3] + (width,))
      feature_fusion.fuse(h, fused[dec], self.mode, block, num_heads=2, head_dim=0,
                          max_groups=32, dtype=jnp.float32)


@pytest.mark.parametrize("mode", ["caa", "skip"])
def test_fresh_fusion_is_identity_then_output_depends_on_fused(mode):
  seg = _tiny(attention_resolutions=(), fusion=mode, fusion_blocks=FUSED)
  plain = _tiny(attention_resolutions=())
  x, t, fused = _normal(0, (B, HW, HW, C)), jnp.array([5, 400]), _fused(10)
  # Random UNet weights (NumPy), fresh fusion layers: compiling the UNet's `init` is slow.
  shapes = _shapes(seg, fused=fused)[0]
  fresh = jax.jit(_FusionLayers(mode).init)(_key(), fused)["params"]
  names = {"caa": {"up_1_1_caa", "up_0_0_caa"},
           "skip": {"up_1_1_skip", "up_0_0_skip"}}[mode]  # dec_2, dec_3.
  assert set(_fusion_params(shapes)) == names
  assert _flat(fresh) == _flat(_fusion_params(shapes))
  zero = {k: v for k, v in flax.traverse_util.flatten_dict(fresh, sep="/").items()
          if k.split("/")[1] in ("out", "kernel", "bias")}
  assert zero and all(not np.any(np.asarray(v)) for v in zero.values())
  shared = {k: v for k, v in _random(shapes, seed=1).items() if k not in names}
  assert _flat(shared) == _flat(_shapes(plain)[0])
  params = {**shared, **fresh}
  apply_seg = jax.jit(lambda p, f: seg.apply({"params": p}, x, t, fused=f,
                                             return_features=True))
  ref_out, ref_feats = jax.jit(lambda p: plain.apply({"params": p}, x, t,
                                                     return_features=True))(shared)
  out, feats = apply_seg(params, fused)
  assert float(jnp.abs(ref_out).min()) > 0.0
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
  for n in ref_feats:
    np.testing.assert_allclose(np.asarray(feats[n]), np.asarray(ref_feats[n]),
                               rtol=1e-6, atol=1e-6, err_msg=n)
  # Trained (perturbed) fusion layers: the output now depends on the fused features.
  params = {**shared, **_random(fresh, seed=2)}
  out_a, feats_a = apply_seg(params, fused)
  out_b, _ = apply_seg(params, _fused(20))
  for other in (ref_out, out_b):
    per_example = np.asarray(jnp.abs(out_a - other).max(axis=(1, 2, 3)))
    assert per_example.min() > 1e-4, per_example
  # dec_1 precedes every fused block; dec_2 (fused) is the fused feature.
  np.testing.assert_allclose(np.asarray(feats_a["dec_1"]), np.asarray(ref_feats["dec_1"]),
                             rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(feats_a["dec_2"] - ref_feats["dec_2"]).max()) > 1e-4


def test_caa_attends_over_the_fused_feature_tokens():
  """Q from the segmentation features, K/V from the fused tokens; rows sum to 1."""
  model = _tiny(attention_resolutions=(), num_heads=2, fusion="caa", fusion_blocks=FUSED)
  x, t, fused = _normal(0, (B, HW, HW, C)), jnp.array([5, 400]), _fused(10)
  params = _random(_shapes(model, fused=fused)[0])
  _, state = jax.jit(lambda p: model.apply(
      {"params": p}, x, t, fused=fused, mutable=["intermediates"],
      capture_intermediates=lambda m, _: any(n.endswith("_caa") for n in m.path)))(params)
  inter = state["intermediates"]
  for dec, block in (("dec_2", "up_1_1_caa"), ("dec_3", "up_0_0_caa")):
    f = np.asarray(fused[dec], np.float64)
    tokens = f.reshape(B, -1, f.shape[-1])
    q = np.asarray(inter[block]["query"]["__call__"][0], np.float64)
    kv = np.asarray(inter[block]["key_value"]["__call__"][0], np.float64)
    p = params[block]
    np.testing.assert_allclose(
        kv, np.einsum("bld,dknh->blknh", tokens, np.asarray(p["key_value"]["kernel"])),
        rtol=1e-4, atol=1e-4)
    k, v = kv[:, :, 0], kv[:, :, 1]
    w = np.asarray(jax.jit(attn_lib.attention_weights)(q, k), np.float64)
    hw = (HW // du.decoder_blocks((1, 2), 1)[dec].ds) ** 2
    assert w.shape == (B, 2, hw, tokens.shape[1])  # (B, heads, seg positions, tokens).
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    o = np.einsum("bnqk,bknd->bqnd", w, v)
    o = np.einsum("bqnd,ndc->bqc", o, np.asarray(p["out"]["kernel"])) + np.asarray(
        p["out"]["bias"])
    out = np.asarray(inter[block]["out"]["__call__"][0], np.float64)
    np.testing.assert_allclose(out, o, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,fused,match", [
    (dict(fusion="cross"), None, "fusion must be one of .*'cross'"),
    (dict(fusion="caa", fusion_blocks=("dec_9",)), {},
     r"\['dec_9'\] do not exist.*'dec_4'\]"),
    (dict(fusion="skip", fusion_blocks=FUSED), {"dec_3": jnp.zeros((B, 8, 8, 4))},
     r"'dec_2' .* missing; expected shape \(2, 4, 4\)"),
    (dict(fusion="caa", fusion_blocks=FUSED), None, "'dec_2' .* missing"),
    (dict(fusion="caa", fusion_blocks=FUSED),
     {"dec_2": jnp.zeros((B, 8, 8, 5)), "dec_3": jnp.zeros((B, 8, 8, 5))},
     r"'dec_2' has shape \(2, 8, 8, 5\), expected \(B, h, w\) = \(2, 4, 4\)"),
    (dict(fusion="caa", fusion_blocks=FUSED),
     {"dec_2": jnp.zeros((B, 4, 4, 5)), "dec_3": jnp.zeros((3, 8, 8, 5))},
     r"'dec_3' has shape \(3, 8, 8, 5\), expected \(B, h, w\) = \(2, 8, 8\)"),
    (dict(fusion="skip", fusion_blocks=("dec_2",)), {"dec_2": jnp.zeros((B, 16, 5))},
     r"'dec_2' has shape \(2, 16, 5\)"),
    (dict(), {"dec_2": jnp.zeros((B, 4, 4, 5))}, "fusion='none' but got fused"),
    (dict(fusion_blocks=("dec_2",)), None, r"fusion='none'.*\('dec_2',\)"),
    (dict(ref_embed_dim=REF_DIM, ref_attention_resolutions=(4,)), None,
     r"ref_attention_resolutions=\(4,\) must be .*\[1, 2\]"),
])
def test_bad_fusion_or_mcaa_settings_raise(kw, fused, match):
  conds = {"ref_embed": jnp.zeros((B, REF_DIM))} if "ref_embed_dim" in kw else {}
  with pytest.raises(ValueError, match=match):
    _shapes(_tiny(**kw), fused=fused, **conds)


def test_groupnorm_seg_unet_shares_every_non_spade_non_mcaa_path():
  """DSDM (SPADE + MCAA) -> segmentation UNet (GroupNorm, CAA) weight transfer."""
  common = dict(spade_mid=True, ref_attention_resolutions=(1, 2))
  dsdm = _tiny(learned_variance=True, spade_channels=K_MASK, ref_embed_dim=REF_DIM,
               **common)
  seg = du.get_diffusion_unet("tiny", 4, fusion="caa", fusion_blocks=FUSED, **common)
  d_params, (_, feats) = _shapes(dsdm, return_features=True, spatial_cond=_segmap(0),
                                 ref_embed=jnp.zeros((B, REF_DIM)))
  # The DSDM's full return_features dict is a valid `fused` (extra blocks ignored).
  s_params, s_out = _shapes(seg, fused=feats)
  assert s_out.shape == (B, HW, HW, 4)
  d, s = _flat(d_params), _flat(s_params)

  def kind(p):
    parts = p.split("/")
    if "spade_in" in parts or "spade_out" in parts:
      return "spade"
    if parts[0].endswith("_ref_xattn") or parts[0].startswith("ref_fc_ds"):
      return "mcaa"
    return "out" if parts[0] == "out_conv" else "shared"

  kinds = {}
  for p in d:
    kinds.setdefault(kind(p), set()).add(p)
  spade_blocks = {p.split("/")[0] for p in kinds["spade"]}
  assert spade_blocks == {"mid_0", "mid_1", "up_0_0", "up_0_1", "up_1_0", "up_1_1"}
  assert {p.split("/")[0] for p in kinds["mcaa"]} == {
      "down_0_0_ref_xattn", "down_1_0_ref_xattn", "mid_ref_xattn", "up_0_0_ref_xattn",
      "up_0_1_ref_xattn", "up_1_0_ref_xattn", "up_1_1_ref_xattn", "ref_fc_ds1",
      "ref_fc_ds2"}
  for p in kinds["shared"]:
    assert s.get(p) == d[p], p
  assert d["out_conv/kernel"] == (3, 3, 16, 6) and s["out_conv/kernel"] == (3, 3, 16, 4)
  # What the segmentation UNet adds: GroupNorms where DSDM has SPADE, and the CAA blocks.
  extra = set(s) - set(d)
  norms = {p for p in extra if p.split("/")[0] in spade_blocks}
  assert norms == {f"{m}/norm_{w}/{v}" for m in spade_blocks for w in ("in", "out")
                   for v in ("scale", "bias")}
  for m in spade_blocks:
    for w in ("in", "out"):
      channels = d[f"{m}/spade_{w}/gamma/kernel"][-1]
      assert s[f"{m}/norm_{w}/scale"] == s[f"{m}/norm_{w}/bias"] == (channels,)
  assert {p.split("/")[0] for p in extra - norms} == {"up_1_1_caa", "up_0_0_caa"}
  # CAA keys/values take the DSDM feature channels (32 at dec_2, 16 at dec_3).
  assert s["up_1_1_caa/key_value/kernel"] == (32, 2, 2, 16)
  assert s["up_0_0_caa/key_value/kernel"] == (16, 2, 2, 8)
