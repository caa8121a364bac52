"""The one trainer: sharding equivalence, NaN guard, checkpoints, init_from, pipelines."""
import json

import jax
import numpy as np
import pytest

from medrep_jax.data import loader
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.train import pipeline, trainer

from conftest import config_module, load_config, one_step

finetune_config = config_module("finetune").finetune_config


def tiny(task="classification", **train):
  c = finetune_config(task=task, size="tiny")
  c.data.num_examples = 64
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_sharded_step_equals_single_device(task, tmp_path):
  assert jax.device_count() == 8
  config = tiny(task)
  # SGD: Adam's first step is ~lr*sign(g), which turns fp32 reduction-order noise in
  # near-zero gradients into lr-sized parameter differences.
  config.optim.name = "sgd"
  p1, s1, m1 = one_step(config, jax.devices()[:1], tmp_path / "one")
  p8, s8, m8 = one_step(config, jax.devices(), tmp_path / "eight")
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p8, s8))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
  config = tiny(num_steps=6, checkpoint_every=1, log_every=1)
  config.optim.name = "sgd"
  config.optim.lr = 1e30  # step 1 is finite; the update makes step 2 overflow.
  with pytest.raises(trainer.NonFiniteError, match=r"'loss' .* at step 2"):
    trainer.train_and_evaluate(config, tmp_path)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
  assert ckpt.latest_step() == 1
  saved = ckpt_lib.load_state_tree(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
  assert not (tmp_path / "done.json").exists()


def test_checkpoint_round_trip_and_iterator_state(tmp_path):
  config = tiny(num_steps=3, checkpoint_every=3)
  trainer.train_and_evaluate(config, tmp_path / "a")
  t = trainer.Trainer(config, tmp_path / "a")
  ds = loader.train_dataset(t.method.make_source("train"), t.method.transforms("train"),
                            global_batch=8, seed=0)
  with jax.set_mesh(t.mesh):
    fresh = t.build_state(mesh_lib.to_global(ds[0], t.mesh))
    restored, iter_state = t.checkpointer.restore(fresh)
  assert int(restored.step) == 3
  assert json.loads(iter_state) if isinstance(iter_state, str) else iter_state
  saved = ckpt_lib.load_state_tree(tmp_path / "a")
  for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(
      jax.device_get(restored.params))):
    np.testing.assert_array_equal(a, b)
  # The iterator resumes at batch 3: its next batch equals ds[3].
  it = loader.iterate(ds, state=iter_state)
  np.testing.assert_array_equal(next(it)["image"], ds[3]["image"])
  # A finished run returns at once.
  again = trainer.train_and_evaluate(config, tmp_path / "a")
  assert again["step"] == 3


def test_merge_by_path_rules_and_shapes():
  target = {"encoder": {"w": np.zeros((2, 2)), "b": np.zeros(3)}, "head": {"k": np.zeros(4)}}
  source = {"backbone": {"w": np.ones((2, 2)), "b": np.ones(5)}, "head": {"k": np.ones(4)}}
  merged, loaded, fresh = ckpt_lib.merge_by_path(target, source, "backbone:encoder")
  assert loaded == ["encoder/w"]
  assert sorted(fresh) == ["encoder/b", "head/k"]  # shape mismatch; head not in the rules
  np.testing.assert_array_equal(merged["encoder"]["w"], 1.0)
  np.testing.assert_array_equal(merged["head"]["k"], 0.0)
  merged, loaded, _ = ckpt_lib.merge_by_path(target, source, "")
  assert loaded == ["head/k"]


def test_pipeline_init_from_and_skip(tmp_path, capsys):
  import ml_collections as mlc
  cls = tiny()
  seg = tiny("segmentation")
  seg.init_from = "stage:classify"
  seg.init_from_rules = "encoder:encoder"
  config = mlc.ConfigDict({"stages": ("classify", "segment"), "classify": cls,
                           "segment": seg})
  pipeline.run_pipeline(config, tmp_path)
  lines = (tmp_path / "segment" / "init_from.txt").read_text().splitlines()
  assert any(l.startswith("params/encoder/") for l in lines)
  assert any(l.startswith("model_state/batch_stats/encoder/") for l in lines)
  assert (tmp_path / "report.md").exists()
  seg_cfg = json.loads((tmp_path / "segment" / "config.json").read_text())
  assert seg_cfg["init_from"] == str(tmp_path / "classify")
  # The warm start copies the classifier's final encoder exactly, and leaves the decoder.
  resolved = pipeline.resolve_stage_refs(seg, tmp_path, ["classify"])
  t = trainer.Trainer(resolved, tmp_path / "probe")
  ds = loader.train_dataset(t.method.make_source("train"), t.method.transforms("train"),
                            global_batch=8, seed=0)
  with jax.set_mesh(t.mesh):
    state = t.build_state(mesh_lib.to_global(ds[0], t.mesh))
    warm = t.warm_start(state)
  cls_enc = ckpt_lib.load_state_tree(tmp_path / "classify")["params"]["encoder"]
  for a, b in zip(jax.tree.leaves(cls_enc), jax.tree.leaves(jax.device_get(
      warm.params["encoder"]))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params["decoder"])),
                  jax.tree.leaves(jax.device_get(warm.params["decoder"]))):
    np.testing.assert_array_equal(a, b)
  # Re-running skips finished stages.
  pipeline.run_pipeline(config, tmp_path)
  assert capsys.readouterr().out.count("done, skipping") == 2


def test_stage_reference_must_be_earlier(tmp_path):
  import ml_collections as mlc
  a = tiny()
  a.init_from = "stage:later"
  config = mlc.ConfigDict({"stages": ("a",), "a": a})
  with pytest.raises(ValueError, match="refers to stage 'later'"):
    pipeline.run_pipeline(config, tmp_path)


def test_logs_the_learning_rate_and_prints_eval_metrics(tmp_path, capsys):
  config = load_config("finetune")
  with config.unlocked():
    config.data.num_examples = 32
    config.train.num_steps = 3
  final = trainer.train_and_evaluate(config, tmp_path)
  from medrep_jax.core import optim  # pylint: disable=g-import-not-at-top
  schedule = optim.make_schedule(config.optim, 3)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  lrs = {r["step"]: r["lr"] for r in rows if r["split"] == "train"}
  assert lrs == pytest.approx({s: float(schedule(s - 1)) for s in (1, 2, 3)})
  out = capsys.readouterr().out
  assert "final evaluation at step 3" in out
  assert f"accuracy={final['eval/accuracy']:.4g}" in out


def test_a_method_without_loss_fn_or_train_step_is_refused_when_built():
  from medrep_jax.methods import base  # pylint: disable=g-import-not-at-top

  class NoStep(base.Method):
    model = None

  with pytest.raises(TypeError, match="must define loss_fn"):
    NoStep(load_config("finetune"))


def test_pipeline_report_compares_pairs_of_stages(tmp_path):
  results = {"seg": {"eval/dice": 0.8, "eval/hd95": 3.0, "step": 10},
             "seg_random": {"eval/dice": 0.6, "eval/hd95": 5.0, "step": 10},
             "pre": {"eval/knn_accuracy": 0.5}}
  path = pipeline.write_pipeline_report(tmp_path, ["pre", "seg", "seg_random"], results,
                                        compare=[("seg", "seg_random")],
                                        labels=("pretrained", "random init"))
  text = path.read_text()
  assert "| task | metric | pretrained | random init | difference |" in text
  assert "| seg vs seg_random | dice | 0.8 | 0.6 | +0.2 |" in text
  assert "| seg vs seg_random | hd95 | 3 | 5 | -2 |" in text
  assert "![comparison](figures/comparison.png)" in text
  assert (tmp_path / "figures" / "comparison.png").stat().st_size > 1000


@pytest.mark.xdist_group("quickstart")  # shares test_cli's tiny_run("quickstart")
def test_tiny_quickstart_writes_the_comparison(tiny_run):
  root = tiny_run("quickstart")
  text = (root / "report.md").read_text()
  assert "| probe vs probe_random | accuracy |" in text
  assert "| segment vs segment_random | dice |" in text
  assert (root / "figures" / "comparison.png").exists()
  assert json.loads((root / "probe" / "config.json").read_text())["init_from"] == str(
      root / "pretrain")


def test_ema_is_bias_corrected():
  """EMAParams keeps the bias-corrected EMA: the first update copies the params, and
  update t holds sum_s decay^(t-s) p_s / sum_s decay^(t-s) (no weight on the init)."""
  import jax.numpy as jnp
  import ml_collections
  from medrep_jax.core.state import TrainState
  from medrep_jax.methods import base

  class Plain:  # stands in for a Method: the "update" sets the params to batch["p"]
    def __init__(self, config, workdir=None, mesh=None):
      self.config = config

    def train_step(self, state, batch, rng):
      return state.replace(step=state.step + 1, params=batch["p"]), {}

  class WithEMA(base.EMAParams, Plain):
    pass

  decay, seen = 0.9, [3.0, -1.0, 5.0, 2.0]
  method = WithEMA(ml_collections.ConfigDict(dict(ema_decay=decay)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=jnp.float32(100.0), opt_state=None,
                     extras={"ema": jnp.float32(100.0)})  # the init must not count
  for t, p in enumerate(seen, 1):
    state, _ = jax.jit(method.train_step)(state, {"p": jnp.float32(p)}, None)
    w = decay ** np.arange(t - 1, -1, -1)
    np.testing.assert_allclose(float(state.extras["ema"]), np.dot(w, seen[:t]) / w.sum(),
                               rtol=2e-5)  # float32 step sizes
