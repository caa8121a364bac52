"""The shared real sets load, as they are, through their documented config lines (issue 13),
and a tiny run trains on each."""
import numpy as np
import pytest

from conftest import load_config
from medrep_jax.data import registry

pytestmark = [pytest.mark.realdata, pytest.mark.xdist_group("shared_data")]

# preset -> (len of train, val, test), mask ids, channels, classes
EXPECTED = {
    "drive": ((18, 2, 20), {0, 1}, 3, 0),
    "busi": ((624, 78, 78), {0, 1, 2}, 1, 3),
    "kaggle_lungs_ct_64": ((192, 21, 54), {0, 1}, 1, 0),
    "isbi2012_membrane": ((24, 3, 3), {0, 1}, 1, 0),
    "covid_ct": ((50, 6, 6), None, 1, 0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_set_loads_through_its_preset(data_dir, name):
  del data_dir  # conftest sets MEDREP_DATA_DIR from it
  sizes, ids, channels, classes = EXPECTED[name]
  cfg = registry.data_config(name)
  got = tuple(len(registry.get_source(cfg, s)) for s in ("train", "val", "test"))
  assert got == sizes
  src = registry.get_source(cfg, "val")
  info = src.info
  assert info.channels == channels and info.num_classes == classes
  assert info.has_mask == (ids is not None) and src.skipped == []
  seen = set()
  for i in range(len(src)):
    r = src[i]
    assert r["image"].shape[-1] == channels
    if ids is not None:
      assert r["mask"].shape == r["image"].shape[:2]
      seen |= set(np.unique(r["mask"]).tolist())
  if ids is not None:
    assert seen <= ids and 1 in seen


def test_shared_set_details(data_dir):
  del data_dir
  drive = registry.get_source(registry.data_config(
      "drive", roi_mask="{split}/mask/{id}_{tag}_mask.gif"), "test")
  r = drive[0]
  assert set(np.unique(r["roi"]).tolist()) == {0, 1} and r["roi"].mean() > 0.5
  outside = (r["mask"] > r["roi"]).mean()
  assert outside < 1e-3 < r["mask"].mean()  # vessels lie inside the field of view
  busi = registry.get_source(registry.data_config("busi"), "all")
  two = [i for i, it in enumerate(busi.catalog.items) if len(it.masks) == 2]
  assert len(two) == 16 and max(len(it.masks) for it in busi.catalog.items) == 3
  assert np.bincount([int(it.label) for it in busi.catalog.items]).tolist() == [133, 437, 210]
  isbi = registry.get_source(registry.data_config("isbi2012_membrane"), "train")
  assert isbi[0]["mask"].mean() < 0.5  # membranes (stored as 0) are the thin foreground
  ct = registry.get_source(registry.data_config("covid_ct"), "all")
  patients = {s: {g for g in registry.get_source(registry.data_config("covid_ct"), s).groups}
              for s in ("train", "val", "test")}
  assert not patients["train"] & (patients["val"] | patients["test"])
  assert len(set(ct.groups)) == 10


def _shrink(config):
  with config.unlocked():
    config.train.max_eval_examples = 8
  return config


# Mostly XLA compilation and the checkpoint write (~15-35 s each on 2 shared cores).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["drive", "busi", "kaggle_lungs_ct_64", "isbi2012_membrane"])
def test_tiny_segmentation_finetune(data_dir, tmp_path, name):
  del data_dir
  from medrep_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = _shrink(load_config("finetune", f"size=tiny,task=segmentation,data={name}"))
  out = trainer.train_and_evaluate(config, tmp_path)
  assert out["step"] == 2 and 0 <= out["eval/dice"] <= 1 and np.isfinite(out["train/loss"])


@pytest.mark.slow
def test_tiny_pretraining_on_covid_ct(data_dir, tmp_path):
  """covid_ct has neither labels nor masks: a tiny contrastive pretraining run."""
  del data_dir
  from medrep_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = _shrink(load_config("dcl_cstp", "variant=simclr,size=tiny,data=covid_ct"))
  trainer.train_and_evaluate(config, tmp_path)
  assert (tmp_path / "done.json").exists()
