"""LTDiff++ stage `ae`: the config's paper values, both kernels' slices, the deep-supervision
step (every head reported, weights applied), the sharded step, bf16, the tiny run's report,
config errors, and the real COVID-19 CT pairs (tiny, phantoms unless stated)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax import config_lib, methods
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.data import loader
from medrep_jax.data.kernel_pairs import Simulation
from medrep_jax.data.sources import DataError, Source, SourceInfo
from medrep_jax.methods.ltdiff_parts import common
from medrep_jax.methods.ltdiff_parts import data as data_lib
from medrep_jax.train import trainer

from conftest import config_module, one_step

ltdiff_cfg = config_module("ltdiff")


def _tiny(data="phantoms", **changes):
  c = ltdiff_cfg.ae_config(size="tiny", data=data)
  c.data.num_examples = 16
  c.train.progress = False
  for key, value in changes.items():
    parent, _, name = key.rpartition(".")
    (c[parent] if parent else c)[name] = value
  return c


# ------------------------------------------------------------------------------ config
def test_paper_and_small_configs():
  paper = ltdiff_cfg.get_config("")
  assert (paper.method, paper.stage, paper.data.name) == ("ltdiff", "ae", "covid_ct")
  assert (paper.optim.name, paper.optim.lr, paper.optim.schedule) == ("adam", 1e-4, "constant")
  assert paper.train.num_epochs == 400 and paper.loss.kind == "l1"
  assert tuple(paper.model.widths) == (32, 64, 128, 256, 512)
  # The simulation fields are the spec's pilot, i.e. `Simulation`'s defaults.
  assert dict(paper.data.simulation) == dataclasses.asdict(Simulation())
  assert data_lib.window(paper.data) == (0.0, 2000.0)
  for size, latent in (("paper", (16, 16, 4)), ("small", (16, 16, 4)), ("tiny", (8, 8, 4))):
    c = ltdiff_cfg.get_config(f"size={size}")
    stage = methods.load_method(c)
    s = int(c.data.image_size)
    shape = jax.eval_shape(
        lambda x, st=stage: st.model.init_with_output(jax.random.key(0), x, train=False,
                                                      method="encode")[0][0],
        jax.ShapeDtypeStruct((1, s, s, 1), jnp.float32))
    assert shape.shape[1:] == latent, size
  assert ltdiff_cfg.get_config("size=tiny").train.num_steps <= 2


@pytest.mark.parametrize("arg,match", [("stage=fit", "Allowed stage values"),
                                       ("data=kermany", "Allowed data values"),
                                       ("size=smal", "Did you mean 'small'")])
def test_bad_variant_args(arg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    ltdiff_cfg.get_config(arg)


@pytest.mark.parametrize("key,value,error,match", [
    ("loss.kind", "bce_dice", config_lib.ConfigError, "mask loss.*allow_bce_dice=True"),
    ("loss.kind", "l3", config_lib.ConfigError, r"expected one of \('l1', 'l2'\)"),
    ("loss.head_weights", (1.0, 1.0, 1.0), config_lib.ConfigError, "need 2 non-negative"),
    ("loss.head_weights", (0.0, 0.0), config_lib.ConfigError, "not all"),
    ("model.skip_mode", "off", config_lib.ConfigError, "model.skip_mode"),
    ("model.widths", (4,), config_lib.ConfigError, ">= 2 positive widths"),
    ("data.image_size", 34, config_lib.ConfigError, "multiple of 2\\^\\(depth-1\\) = 4"),
    ("remat", True, config_lib.ConfigError, "remat"),
    ("data.window_width", 0.0, DataError, "needs an HU window"),
])
def test_bad_config_values_name_the_key(key, value, error, match):
  with pytest.raises(error, match=match):
    methods.load_method(_tiny(**{key: value}))


def test_bad_data_fields_name_the_field(tmp_path):
  c = _tiny()
  c.data.simulation.i0_typo = 1.0
  with pytest.raises(DataError, match="i0_typo"):
    methods.load_method(c).make_source("train")
  c = _tiny(data="covid_ct")
  c.data.root = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="nowhere"):
    methods.load_method(c).make_source("train")


# ------------------------------------------------------------------------------ data
class _Pairs(Source):
  def __init__(self, n):
    self.a = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 1))
    self.groups = [f"p{i // 2}" for i in range(n)]
    self.info = SourceInfo("pairs", 0, (), 1, image_dtype="float32")

  def _num_elements(self):
    return len(self.a)

  def _load(self, i):
    return {"image_a": self.a[i], "image_b": self.a[i] + 100}


def test_both_kernels_gives_every_pairs_a_then_b():
  src = data_lib.BothKernels(_Pairs(3))
  assert len(src) == 6 and src.groups == ["p0", "p0", "p0", "p0", "p1", "p1"]
  for i in range(6):
    r = src[i]
    assert (int(r["pair"]), int(r["kernel"]), int(r["index"])) == (i // 2, i % 2, i)
    assert r["image"].shape == (4, 4, 1) and r["image"][0, 0, 0] == i // 2 + 100 * (i % 2)
  bad = data_lib.BothKernels(_Pairs(1))
  bad.pairs._load = lambda i: {"image_a": np.zeros((4, 4, 1))}  # pylint: disable=protected-access
  with pytest.raises(DataError, match="image_b"):
    bad[1]


def test_phantom_pairs_are_windowed_smooth_a_and_sharp_b():
  stage = methods.load_method(_tiny())
  src = stage.make_source("train")
  assert len(src) == 32 and src.info.channels == 1
  a, b = src[0]["image"][..., 0], src[1]["image"][..., 0]
  assert 0.0 <= min(a.min(), b.min()) and max(a.max(), b.max()) <= 1.0
  grad = lambda x: np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()
  assert grad(b) > 1.2 * grad(a)  # ramp (B) is sharper and noisier than Hann at 0.5 (A)
  np.testing.assert_array_equal(src[0]["image"], src[0]["image"])  # deterministic noise
  np.testing.assert_allclose(data_lib.to_hu(np.array([0.0, 0.5, 1.0]), stage.config.data),
                             [-1000.0, 0.0, 1000.0])


def test_covid_ct_pairs_split_by_patient(data_dir, tmp_path):
  if not (data_dir / "ct_covid19_ny_sbu_dicom").is_dir():
    pytest.skip("ct_covid19_ny_sbu_dicom not found")
  c = _tiny(data="covid_ct")
  c.data.cache_dir = str(tmp_path)
  stage = methods.load_method(c)
  parts = {s: stage.make_source(s) for s in ("train", "val", "test")}
  assert sum(len(p) for p in parts.values()) == 2 * c.data.max_slices
  patients = [set(p.groups) for p in parts.values()]
  assert all(patients) and not set.intersection(*patients)
  r = parts["train"][0]
  assert r["image"].shape == (32, 32, 1) and 0 <= r["image"].min() < r["image"].max() <= 1
  assert len(list(tmp_path.glob("ct_covid19_ny_sbu_dicom_*.npz"))) == 1  # for all splits
  c.data.include = "/axial/"  # no reformats
  axial = methods.load_method(c).make_source("train")
  assert 0 < len(axial) < len(parts["train"])
  assert all("/axial/" in p for p in axial.pairs.ids)
  c.data.include = "/oblique/"
  with pytest.raises(DataError, match="matches none"):
    methods.load_method(c).make_source("train")


# ------------------------------------------------------------------------------ steps
def test_sharded_step_equals_single_device_and_reports_every_head(tmp_path):
  assert jax.device_count() == 8
  config = _tiny()
  config.optim.name = "sgd"  # Adam's first step is lr*sign(g): it amplifies fp32 noise
  config.loss.head_weights = (0.25, 0.75)
  p1, s1, m1 = one_step(config, jax.devices()[:1], tmp_path / "one")
  p8, s8, m8 = one_step(config, jax.devices(), tmp_path / "eight")
  heads = {k for k in m1 if k.startswith("loss_head")}
  assert heads == {"loss_head1", "loss_head2"}  # widths (4, 8, 16): heads on X_(0,1..2)
  np.testing.assert_allclose(m1["loss"], 0.25 * m1["loss_head1"] + 0.75 * m1["loss_head2"],
                             rtol=1e-6)
  assert m1["grad_norm"] > 0
  for k in ("loss", *heads):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p8, s8))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _train(config, tmp_path, steps):
  t = trainer.Trainer(config, tmp_path, devices=jax.devices()[:1])
  ds = loader.train_dataset(t.method.make_source("train"), t.method.transforms("train"),
                            global_batch=config.train.batch_size, seed=0)
  with jax.set_mesh(t.mesh):
    batch = mesh_lib.to_global(ds[0], t.mesh)
    state, step = t.build_state(batch), t._compile_step()  # pylint: disable=protected-access
    losses = []
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return jax.device_get(state), np.array(losses)


def test_ae_fits_a_batch_and_bf16_keeps_fp32_state(tmp_path):
  s32, l32 = _train(_tiny(**{"optim.lr": 1e-2}), tmp_path / "f32", steps=8)
  s16, l16 = _train(_tiny(**{"optim.lr": 1e-2, "dtype": "bfloat16"}), tmp_path / "b16", 8)
  assert l32[-1] < 0.5 * l32[0], l32  # it reconstructs
  np.testing.assert_allclose(l16, l32, rtol=0.1, atol=0.01)
  for leaf in jax.tree.leaves((s16.params, s16.opt_state, s16.model_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_printed_bce_dice_behind_its_switch_trains_logit_heads(tmp_path):
  c = _tiny(**{"loss.kind": "bce_dice", "loss.allow_bce_dice": True, "optim.lr": 1e-2})
  stage = methods.load_method(c)
  heads = [jnp.full((2, 32, 32, 1), v) for v in (-3.0, 0.0)]
  assert common.printed_loss(c)
  np.testing.assert_allclose(common.to_image(c, heads[0]), jax.nn.sigmoid(-3.0), rtol=1e-6)
  assert stage.head_weights is None
  _, losses = _train(c, tmp_path, steps=6)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  l1 = _tiny()
  np.testing.assert_array_equal(common.to_image(l1, heads[0]), 0.0)  # l1: clipped


def test_direct_stage_regresses_b_from_a():
  pairs = data_lib.PhantomPairs("train", image_size=32, num_examples=2, seed=0,
                                sim=Simulation(num_views=45, i0=5e4), window_hu=(0.0, 2000.0))
  direct = data_lib.AToB(pairs)
  assert len(direct) == 2
  r, p = direct[1], pairs[1]
  np.testing.assert_array_equal(r["image"], p["image_a"])
  np.testing.assert_array_equal(r["target"], p["image_b"])
  c = ltdiff_cfg.get_config("stage=direct,size=tiny,data=phantoms")
  stage = methods.load_method(c)
  batch = {"image": jnp.zeros((1, 32, 32, 1)), "target": jnp.ones((1, 32, 32, 1))}
  assert stage.target(batch) is batch["target"]
  assert (c.loss.kind, c.optim.lr) == ("l1", 1e-3)


# ------------------------------------------------------------------------------ a run
@pytest.mark.xdist_group("ltdiff")  # shares test_cli's tiny_run("ltdiff")
def test_tiny_run_reports_reconstructions(tiny_run):
  workdir = tiny_run("ltdiff")
  report = (workdir / "report.md").read_text()
  assert "figures/reconstructions.png" in report and "[-1000, 1000]" in report
  assert (workdir / "figures" / "reconstructions.png").stat().st_size > 1000
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  final = [r for r in rows if r["split"] == "eval"][-1]
  assert {"loss_head1", "loss_head2"} <= set(train[-1])
  for key in ("eval/l1", "eval/psnr", "eval/mae_hu", "eval/l1_a", "eval/l1_b",
              "eval/l1_head1", "eval/l1_head2"):
    assert np.isfinite(final[key]), key
  np.testing.assert_allclose(final["eval/mae_hu"], 2000 * final["eval/l1"], rtol=1e-5)
  assert final["eval/l1"] <= final["eval/l1_head2"] + 1e-6  # the deepest head, clipped
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data_info"]["channels"] == 1 and saved["data_info"]["image_shape"] == [32, 32, 1]
  trained = methods.load_trained(workdir, method="ltdiff", stage="ae")
  assert isinstance(trained.model, type(common.build_unetpp(trained.config)))
