"""DSDM stages: the tiny pipeline ref_encoder -> generator -> sample -> filter -> seg ->
probe on phantoms (16 px, shared with test_cli's tiny run), the DSDM -> segmentation
weight transfer, the sharded generator step, the probe's single compilation, the
synthetic dataset and the pieces (derangement, diversity, mixing, config errors)."""
import itertools
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import medrep_jax
from medrep_jax import config_lib, methods
from medrep_jax.core import runs
from medrep_jax.data import readers
from medrep_jax.data.sources import SourceInfo
from medrep_jax.methods.dsdm_parts import common, generator, synthetic

from conftest import assert_same_step, config_module, one_step

dsdm_cfg = config_module("dsdm")


@pytest.fixture(scope="module")
def pipeline_dir(tiny_run):
  return tiny_run("pipeline_dsdm")


# ------------------------------------------------------------------------------ pieces
def test_derangement_has_no_fixed_point_and_is_a_permutation():
  for n in (2, 3, 7, 50):
    for seed in range(3):
      p = generator.derangement(n, seed)
      assert sorted(p) == list(range(n))
      assert not np.any(p == np.arange(n))


def test_diversity_is_the_mean_pairwise_distance_per_mask():
  f = np.random.default_rng(0).normal(size=(3, 4, 5))
  want = np.mean([np.mean([np.linalg.norm(f[m, i] - f[m, j])
                           for i, j in itertools.permutations(range(4), 2)])
                  for m in range(3)])
  np.testing.assert_allclose(generator.diversity(f), want, rtol=1e-10)
  same = np.repeat(f[:, :1], 4, axis=1)
  assert generator.diversity(same) == 0.0
  with pytest.raises(ValueError, match="K >= 2"):
    generator.diversity(f[:, :1])


class _Source:
  def __init__(self, n, value):
    self.n, self.value = n, value
    self.info = SourceInfo(name="s", num_classes=3, class_names=("a", "b", "c"), channels=1,
                           has_mask=True, num_mask_classes=3)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 1), self.value + i, np.uint8),
            "mask": np.full((4, 4), i % 3, np.uint8), "label": 0}


def test_synthetic_pairs_round_trip_and_mix_a_fraction_of_the_pool(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(6, 8, 8, 1)).astype(np.float32)
  masks = rng.integers(0, 3, size=(6, 8, 8))
  synthetic.write(images, masks, tmp_path / "pool")
  pool = synthetic.read(tmp_path / "pool", 3, 1)
  assert len(pool) == 6
  got = [pool[i] for i in range(6)]
  np.testing.assert_array_equal(np.stack([g["mask"] for g in got]), masks)
  np.testing.assert_allclose(np.stack([g["image"] for g in got]) / 255.0, images, atol=1 / 255)
  config = ml_collections.ConfigDict(dict(synthetic_fraction=0.5,
                                      synthetic_dir=str(tmp_path / "pool"), seed=0))
  mixed = synthetic.mix(_Source(10, 0), config, 3)
  assert len(mixed) == 13  # 10 real + half of the 6-image pool
  assert set(mixed[12]) == {"image", "mask", "index"}
  assert len(set(mixed.picked.tolist())) == 3
  config.synthetic_fraction = 0.0
  assert len(synthetic.mix(_Source(10, 0), config, 3)) == 10
  with pytest.raises(config_lib.ConfigError, match="images/ and .*masks/"):
    synthetic.read(tmp_path, 3, 1)


def test_variants_and_missing_runs_give_clear_errors():
  assert common.conditions_of("mask_reference") == (True, True)
  assert common.conditions_of("uncond") == (False, False)
  with pytest.raises(config_lib.ConfigError, match="variant='bogus'"):
    common.conditions_of("bogus")
  seg = methods.load_method(dsdm_cfg.get_config("stage=seg,size=tiny,data=phantoms"))
  with pytest.raises(config_lib.ConfigError, match="generator_from is empty"):
    _ = seg.model
  with pytest.raises(config_lib.ConfigError, match="ref_encoder_from is empty"):
    common.ReferenceEmbedder("")
  # Every variant's eval needs the encoder: the generator fails before training, not after.
  gen = methods.load_method(dsdm_cfg.get_config(
      "stage=generator,variant=mask,size=tiny,data=phantoms"))
  with pytest.raises(config_lib.ConfigError, match="ref_encoder_from is empty"):
    gen.make_source("train")
  with pytest.raises(config_lib.ConfigError, match="fusion='bad'"):
    c = dsdm_cfg.get_config("stage=seg,size=tiny,data=phantoms").unlock()
    c.fusion = "bad"
    methods.load_method(c)


# -------------------------------------------------------------------------- the pipeline
@pytest.mark.xdist_group("pipeline_dsdm")  # shares test_cli's tiny_run
def test_pipeline_runs_end_to_end_and_writes_its_datasets(pipeline_dir):
  for stage in dsdm_cfg.STAGES:
    assert (pipeline_dir / stage / "done.json").exists(), stage
  sample = json.loads((pipeline_dir / "sample" / "config.json").read_text())["sample"]
  n = int(sample["max_masks"]) * int(sample["num_per_mask"])
  pool = readers.ImageMaskFolder(pipeline_dir / "sample" / "images", "all",
                                 mask_threshold=None, num_mask_classes=3)
  assert len(pool) == n
  assert set(np.unique(np.stack([pool[i]["mask"] for i in range(n)]))) <= {0, 1, 2}
  kept = synthetic.read(pipeline_dir / "filter" / "images", 3, 1)
  assert 0 < len(kept) <= n
  m = json.loads((pipeline_dir / "seg" / "done.json").read_text())
  for key in ("mean_dice", "mean_iou", "mean_precision", "mean_recall", "accuracy"):
    assert 0.0 <= m[f"eval/{key}"] <= 1.0, key
  model = medrep_jax.load(pipeline_dir / "seg")  # the frozen DSDM travels in the run
  masks = model.predict(np.random.default_rng(0).integers(0, 255, (2, 16, 16), np.uint8))
  assert masks.shape == (2, 16, 16) and masks.max() < 3
  grid = np.load(pipeline_dir / "probe" / "probe_grid.npy")
  assert grid.shape == (4, 2) and np.all((grid >= 0) & (grid <= 1))
  for fig in ("generator/figures/samples.png", "sample/figures/samples.png",
              "seg/figures/segmentation_overlays.png", "probe/figures/probe.png"):
    assert (pipeline_dir / fig).stat().st_size > 0, fig


@pytest.mark.xdist_group("pipeline_dsdm")
def test_seg_loads_every_dsdm_array_but_spade_mcaa_and_the_head(pipeline_dir):
  ema = runs.load_run(pipeline_dir / "generator").extras["ema"]
  paths = set(traverse_util.flatten_dict(ema, sep="/"))
  own = ("spade_", "_ref_xattn", "ref_fc_ds")
  want = {p for p in paths if not any(s in p for s in own) and not p.startswith("out_conv")}
  assert any("spade_" in p for p in paths) and any("ref_fc_ds" in p for p in paths)
  text = (pipeline_dir / "seg" / "init_from.txt").read_text().split("\n\n")
  section = {block.split("\n")[0]: set(block.split("\n")[1:]) - {""} for block in text[1:]}
  assert section["# loaded"] == want
  assert section["# not used (SPADE, MCAA, output head)"] == paths - want
  # The new arrays are the GroupNorm scales/biases replacing SPADE, the CAA blocks, the head.
  assert all(("norm_" in p) or ("_caa" in p) or p.startswith("out_conv")
             for p in section["# new"])


@pytest.mark.xdist_group("pipeline_dsdm")
def test_probe_extraction_is_one_compilation_for_every_t(pipeline_dir):
  config = dsdm_cfg.get_config("stage=probe,size=tiny,data=phantoms").unlock()
  config.generator_from = str(pipeline_dir / "generator")
  probe = methods.load_method(config, workdir=pipeline_dir / "probe")
  gen = probe.generator.stage
  images = np.random.default_rng(0).uniform(size=(2, 16, 16, 1)).astype(np.float32)
  masks = np.zeros((2, 16, 16), np.int32)
  keys = jax.random.split(jax.random.key(0), 2)
  params = probe.generator.run.extras["ema"]
  outs = [probe.extract_fn(params, images, masks, t, keys) for t in (3, 20, 40)]
  assert probe.extract_fn._cache_size() == 1
  assert set(outs[0]) == {f"dec_{i}" for i in range(1, 5)}
  assert not np.allclose(outs[0]["dec_2"], outs[2]["dec_2"])
  assert gen.num_mask_classes == 3


@pytest.mark.xdist_group("pipeline_dsdm")
def test_sharded_generator_step_equals_single_device(pipeline_dir, tmp_path):
  assert jax.device_count() == 8
  config = dsdm_cfg.get_config("stage=generator,size=tiny,data=phantoms").unlock()
  config.data.num_examples = 32
  config.train.progress = False
  config.optim.name = "sgd"
  config.ref_encoder_from = str(pipeline_dir / "ref_encoder")
  assert_same_step(one_step(config, jax.devices()[:1], tmp_path / "one"),
                   one_step(config, jax.devices(), tmp_path / "eight"))
  refs = np.load(tmp_path / "one" / "ref_train.npy")
  assert refs.shape == (32, 16) and np.abs(refs).sum() > 0
