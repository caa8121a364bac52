"""DCL-CsTP: the sharded dual-stream step equals the 1-device step; variants wire up."""
import jax
import numpy as np
import pytest

from medrep_jax.data import loader
from medrep_jax.core import memory_bank
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.train import trainer

from conftest import config_module

VARIANTS = config_module("dcl_cstp").VARIANTS
dcl_cstp_config = config_module("dcl_cstp").dcl_cstp_config


def tiny(variant="dcl_cstp"):
  c = dcl_cstp_config(variant=variant, data="phantoms", size="tiny")
  c.data.num_examples = 64
  c.optim.name = "sgd"
  return c


def build(config, devices, tmp_path):
  t = trainer.Trainer(config, tmp_path, devices=devices)
  ds = loader.train_dataset(t.method.make_source("train"), t.method.transforms("train"),
                            global_batch=config.train.batch_size, seed=0)
  return t, ds


def one_step(config, devices, tmp_path):
  t, ds = build(config, devices, tmp_path)
  with jax.set_mesh(t.mesh):
    batch = mesh_lib.to_global(ds[0], t.mesh)
    state = t.build_state(batch)
    state, metrics = t._compile_step()(state, batch)
    bank_sharding = state.extras["bank"].sharding
    return jax.device_get((state.params, state.extras, metrics)), bank_sharding


@pytest.mark.slow
def test_sharded_dual_stream_step_equals_single_device(tmp_path):
  config = tiny()
  (p1, e1, m1), _ = one_step(config, jax.devices()[:1], tmp_path / "one")
  (p8, e8, m8), sharding8 = one_step(config, jax.devices(), tmp_path / "eight")
  assert sharding8.spec == jax.sharding.PartitionSpec("data", None)
  for k in ("loss", "loss/nce", "loss/kl", "loss/cs"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(e1["momentum_params"]), jax.tree.leaves(e8["momentum_params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Keys: 1 device writes rows [0, B); each of 8 devices writes rows [0, b) of its shard.
  B, K = config.train.batch_size, config.loss.bank_size
  b = B // 8
  keys1 = e1["bank"][:B]
  keys8 = np.asarray(e8["bank"]).reshape(8, K // 8, -1)[:, :b].reshape(B, -1)
  np.testing.assert_allclose(keys8, keys1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(keys1, axis=1), 1.0, rtol=1e-5)
  assert int(e1["bank_ptr"]) == B % K and int(e8["bank_ptr"]) == b
  # The rows nobody wrote are the same initial keys in both runs.
  rest8 = np.asarray(e8["bank"]).reshape(8, K // 8, -1)[:, b:]
  init = np.asarray(memory_bank.init_bank(jax.random.split(
      jax.random.fold_in(jax.random.key(config.seed), -1 & 0x7FFFFFFF))[1], K,
      config.model.embed_dim)[0]).reshape(8, K // 8, -1)[:, b:]
  np.testing.assert_allclose(rest8, init, rtol=1e-6)


EXPECTED_TERMS = {
    "dcl_cstp": {"nce", "kl", "cs"}, "simclr": {"nt_xent"}, "mocov2": {"nce"},
    "simsiam": {"cs"}, "no_global": {"cs"}, "no_local": {"nce", "kl"},
    "mlp_projector": {"nce", "kl", "cs"}, "standard_attention": {"nce", "kl", "cs"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_wires_the_right_loss_terms(variant, tmp_path):
  config = tiny(variant)
  t, ds = build(config, jax.devices()[:1], tmp_path)
  with jax.set_mesh(t.mesh):
    batch = mesh_lib.to_global(ds[0], t.mesh)
    state = jax.eval_shape(t.method.init_state, jax.random.key(0), batch)
    _, metrics = jax.eval_shape(t.method.train_step, state, batch, jax.random.key(1))
  terms = {k.split("/", 1)[1] for k in metrics if k.startswith("loss/")}
  assert terms == EXPECTED_TERMS[variant]
  assert ("bank" in state.extras) == bool({"nce"} & terms)
  params = state.params
  assert ("predictor" in params) == (variant in ("dcl_cstp", "simsiam", "no_global",
                                                  "mlp_projector", "standard_attention"))
  if variant == "standard_attention":
    assert "self_attention" in str(jax.tree_util.tree_structure(params["projector"]))


def test_bank_larger_than_data_is_rejected_or_fitted(tmp_path, capsys):
  config = tiny()
  config.loss.bank_size = 256  # > 64 phantoms
  config.loss.bank_auto = False
  with pytest.raises(ValueError, match="256"):
    build(config, jax.devices()[:1], tmp_path)[0].method.make_source("train")
  config.loss.bank_auto = True  # K: the largest multiple of the batch the data hold
  method = build(config, jax.devices()[:1], tmp_path / "auto")[0].method
  n, b = len(method.make_source("train")), config.train.batch_size
  assert method.bank_size == n // b * b and method.bank_size < 256
  assert f"K={method.bank_size} keys (loss.bank_size=256" in capsys.readouterr().out
  assert memory_bank.fit_bank(4096, 128, 936, 8) == 896  # the BUSI pipeline's K
  assert memory_bank.fit_bank(512, 128, 4000, 8) == 512  # the paper's K where it fits
  with pytest.raises(ValueError, match="no bank of whole batches"):
    memory_bank.fit_bank(512, 128, 100)


def test_pipeline_preflight_fails_before_any_stage_runs(tmp_path):
  """The bank (or a batch) that cannot fit real + synthetic data fails before the LDM
  stages, with the stage named; nothing is written."""
  from conftest import tiny_config
  from medrep_jax.config_lib import ConfigError
  from medrep_jax.train import pipeline
  config = tiny_config("pipeline_dcl_cstp")
  plan = pipeline.preflight(config, tmp_path)  # the tiny pipeline fits
  pool = plan[str(tmp_path / "filter" / "images")]
  assert pool == config.sample.sample.num_images  # at most every sample
  with config.unlocked():
    config.pretrain.loss.bank_auto = False
    config.pretrain.loss.bank_size = 1 << 20
  with pytest.raises(ConfigError, match=r"pre-flight, stage 5/7 'pretrain' .*K=1048576 "
                     r"keys exceed the \d+ training"):
    pipeline.run_pipeline(config, tmp_path / "run")
  assert not any((tmp_path / "run" / stage).exists() for stage in config.stages)
  with config.unlocked():
    config.pretrain.loss.bank_auto = True
    config.finetune_seg.train.batch_size = 10_000
  with pytest.raises(ConfigError, match=r"stage 7/7 'finetune_seg'.*batch_size=10000 exceeds"):
    pipeline.preflight(config, tmp_path / "run")


def test_synthetic_fraction_is_of_the_pool_and_synthetic_only_drops_real(tmp_path):
  """Table 4: x% of the curated synthetic pool is added (or used alone); the older
  x * |real| rule stays as synthetic_per_real."""
  from medrep_jax import methods
  from medrep_jax.config_lib import ConfigError
  from medrep_jax.data import arrays
  pool = tmp_path / "pool"  # as the ldm sample/filter stages write it
  arrays.write_image_folder(np.arange(10, dtype=np.float32)[:, None, None, None] * 0.1
                            * np.ones((10, 16, 16, 1), np.float32), pool)

  def train_source(**fields):
    c = tiny("simsiam")  # no memory bank: any size of data fits
    c.update(dict(synthetic_dir=str(pool), **fields))
    return methods.load_method(c).make_source("train")

  real = len(train_source())
  assert len(train_source(synthetic_fraction=0.1)) == real + 1
  mixed = train_source(synthetic_fraction=0.5)
  assert len(mixed) == real + 5 and mixed.num_real == real
  assert [int(mixed[i]["index"]) for i in range(len(mixed))] == list(range(real + 5))
  assert len(set(mixed.picked.tolist())) == 5  # distinct pool images
  np.testing.assert_array_equal(mixed.picked, train_source(synthetic_fraction=0.5).picked)
  only = train_source(synthetic_fraction=1.0, synthetic_only=True)
  assert len(only) == 10 and only.num_real == 0
  assert sorted(int(only[i]["image"][0, 0, 0]) for i in range(10)) == [
      round(25.5 * i) for i in range(10)]
  assert len(train_source(synthetic_per_real=0.1)) == real + round(0.1 * real)
  with pytest.raises(ConfigError, match="not both"):
    train_source(synthetic_fraction=0.5, synthetic_per_real=0.1)
  with pytest.raises(ConfigError, match=r"synthetic_fraction must be in \[0, 1\]"):
    train_source(synthetic_fraction=2.0)
  with pytest.raises(ConfigError, match="synthetic_only needs synthetic images"):
    train_source(synthetic_only=True)
