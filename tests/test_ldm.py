"""The `ldm` method: filter scores, and the tiny four-stage pipeline's outputs."""
import csv
import json

import numpy as np
import pytest

from medrep_jax.data import readers
from medrep_jax.data.arrays import ArraySource, write_image_folder
from medrep_jax.data.sources import SourceInfo
from medrep_jax.methods.ldm_parts import filter_stage


def test_realism_score_is_knn_distance_in_standardized_space():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(50, 4)) * np.array([1.0, 10.0, 1.0, 1.0])
  fake = np.stack([real[7], real[7] + np.array([0.0, 0.0, 3.0, 0.0])])
  scores = filter_stage.realism_scores(fake, real, k=1)
  assert scores[0] == pytest.approx(0.0, abs=1e-6)
  sd = real.std(0)[2]
  assert scores[1] <= 3.0 / sd + 1e-9  # at most the distance to real[7]
  assert scores[1] > scores[0]


def test_memorization_flags_near_copies_only():
  rng = np.random.default_rng(1)
  real = rng.uniform(size=(40, 32, 32, 1)).astype(np.float32)
  fake = np.stack([real[3] + 0.001, rng.uniform(size=(32, 32, 1)).astype(np.float32)])
  dist, nn_idx, threshold = filter_stage.memorization(fake, real, copy_quantile=0.05,
                                                      copy_factor=1.0)
  assert nn_idx[0] == 3
  assert dist[0] < threshold < dist[1]


def test_image_folder_round_trip_of_generated_images(tmp_path):
  imgs = np.random.default_rng(2).uniform(size=(3, 8, 8, 1)).astype(np.float32)
  write_image_folder(imgs, tmp_path)
  src = readers.ImageFolder(tmp_path, "all", channels=1)
  assert len(src) == 3 and src.info.class_names == ("synthetic",)
  np.testing.assert_allclose(src[1]["image"][..., 0] / 255.0, imgs[1, ..., 0], atol=1 / 255)


def test_array_source_save_load(tmp_path):
  info = SourceInfo(name="latents", num_classes=0, class_names=(), channels=3)
  src = ArraySource({"mean": np.arange(12.0).reshape(4, 3), "logvar": np.zeros((4, 3))}, info)
  src.save(tmp_path / "c.npz")
  back = ArraySource.load(tmp_path / "c.npz", info)
  np.testing.assert_array_equal(back[2]["mean"], [6.0, 7.0, 8.0])
  assert back[2]["index"] == 2
  with pytest.raises(ValueError, match="differ in length"):
    ArraySource({"a": np.zeros(2), "b": np.zeros(3)}, info)


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline_dcl_cstp")  # the ldm stages of test_cli's tiny run
def test_tiny_pipeline_writes_every_stage_output(tiny_run):
  root = tiny_run("pipeline_dcl_cstp")
  vae = [json.loads(l) for l in (root / "vae" / "metrics.jsonl").read_text().splitlines()]
  assert any("eval/psnr" in r for r in vae)
  assert (root / "vae" / "figures" / "reconstructions.png").exists()
  unet = [json.loads(l) for l in (root / "unet" / "metrics.jsonl").read_text().splitlines()]
  fd = [r for r in unet if "eval/fd" in r]
  assert fd and fd[-1]["eval/fd_lo"] <= fd[-1]["eval/fd"] <= fd[-1]["eval/fd_hi"]
  latents = np.load(root / "unet" / "latents_train.npz")
  assert latents["mean"].shape == (32, 4, 4, 3)  # 16 px / f=4, 3 latent channels
  synth = readers.ImageFolder(root / "sample" / "images", "all")
  assert len(synth) == 16 and synth[0]["image"].shape == (16, 16, 1)
  assert (root / "sample" / "samples" / "grid.png").exists()
  with open(root / "filter" / "scores.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 16
  accepted = readers.ImageFolder(root / "filter" / "images", "all")
  assert len(accepted) == sum(int(r["accepted"]) for r in rows) == 8
  assert (root / "filter" / "figures" / "filter.png").exists()
