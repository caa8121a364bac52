"""CAMContrast on volumes (Sec. 4.7): the attention loss on 3-D CAMs, the heatmaps stage's
volume outputs, export guards and the tiny camcontrast3d pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medrep_jax.losses import cam as cam_losses


def _numpy_attention(cams, probs, labels):
  on = (probs[:, 0] >= 0.5) & (labels == 0)
  per = (1.0 - cams[..., 0] + cams[..., 1]).reshape(len(cams), -1).mean(-1)
  return on.astype(np.float32) * per


def _numpy_attention_multilabel(cams, probs, labels):
  on = np.all(labels == 0, -1) & np.all(probs < 0.5, -1)
  return on.astype(np.float32) * cams.reshape(len(cams), -1).mean(-1)


def test_attention_loss_on_3d_cams_matches_numpy():
  rng = np.random.default_rng(0)
  cams = rng.uniform(size=(4, 3, 4, 5, 2)).astype(np.float32)
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], np.float32)
  labels = np.array([0, 0, 1, 0])
  got = np.asarray(cam_losses.attention_loss(cams, probs, labels))
  np.testing.assert_allclose(got, _numpy_attention(cams, probs, labels), rtol=1e-6)
  assert got[0] > 0 and got[1] == 0 and got[2] == 0 and got[3] > 0
  # 2-D is unchanged: one slice as a (B, h, w, 2) batch
  flat = np.asarray(cam_losses.attention_loss(cams[:, 0], probs, labels))
  np.testing.assert_allclose(flat, _numpy_attention(cams[:, 0], probs, labels), rtol=1e-6)


def test_attention_loss_multilabel_on_3d_cams_matches_numpy():
  rng = np.random.default_rng(1)
  cams = rng.uniform(size=(3, 2, 4, 4, 3)).astype(np.float32)
  probs = np.array([[0.1, 0.2, 0.3], [0.1, 0.7, 0.1], [0.1, 0.1, 0.1]], np.float32)
  labels = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])
  got = np.asarray(cam_losses.attention_loss_multilabel(cams, probs, labels))
  np.testing.assert_allclose(got, _numpy_attention_multilabel(cams, probs, labels), rtol=1e-6)
  assert got[0] > 0 and got[1] == 0 and got[2] == 0
  flat = np.asarray(cam_losses.attention_loss_multilabel(cams[:, 0], probs, labels))
  np.testing.assert_allclose(flat, _numpy_attention_multilabel(cams[:, 0], probs, labels),
                             rtol=1e-6)


# ---------------------------------------------------------------- heatmap statistics


def test_heatmap_stats_on_volumes_use_the_centred_box():
  """3-D `_stats`: the centre box is the half-size box centred on all three axes."""
  from medrep_jax.methods.camcontrast_parts import heatmap_stage
  raw = np.zeros((2, 4, 4, 4), np.float32)
  raw[0, 1:3, 1:3, 1:3] = 1.0  # all mass inside the centred box
  raw[1, 0, 0, 0] = 1.0  # all mass in a corner
  fg = np.ones_like(raw)
  fg[1, 0] = 0.0  # the front slab is background
  got = {"logits": np.array([[0.0, 1.0], [1.0, 0.0]]), "label": np.array([1, 0])}
  stats = heatmap_stage._stats(got, np.array([1, 0]), {"raw": raw, "foreground": fg}, "val")
  assert stats["val/classifier_accuracy"] == 1.0
  assert stats["val/heat_in_centre_abnormal"] == 1.0 and stats["val/heat_in_centre_normal"] == 0
  assert stats["val/peak_in_centre_abnormal"] == 1.0 and stats["val/peak_in_centre_normal"] == 0
  assert stats["val/heat_in_foreground_normal"] == 0.0
  assert stats["val/foreground_fraction"] == 1 - 16 / 128


# ---------------------------------------------------------------- export


def test_3d_encoders_are_not_torch_exportable():
  from medrep_jax import export
  from medrep_jax.models import unet
  for name in ("resnet_tiny", "unet_encoder"):
    assert export.torch_supported(unet.get_encoder(name))
    assert export.torch_supported(unet.Classifier(num_classes=2, encoder=name))
  for name in ("resnet_tiny_3d", "resnet18_3d", "unet_encoder_3d"):
    assert not export.torch_supported(unet.get_encoder(name))
    assert not export.torch_supported(unet.Classifier(num_classes=2, encoder=name))
    assert not export.torch_supported(
        unet.Classifier(num_classes=2, encoder=unet.get_encoder(name, small_input=True)
                        if "resnet" in name else unet.get_encoder(name)))
  assert "spatial_dims=3" in export.TORCH_SUPPORTED


# ---------------------------------------------------------------- the tiny pipeline


@pytest.mark.xdist_group("camcontrast3d")  # shares the cached run with test_cli
def test_tiny_3d_pipeline_writes_volume_crops_and_the_views_figure(tiny_run, tmp_path):
  """configs/camcontrast3d.py at size=tiny on phantoms3d: 16^3 volumes, 2 steps."""
  from medrep_jax import export
  from medrep_jax.methods.camcontrast_parts import crops, heatmap_stage
  workdir = tiny_run("camcontrast3d")
  assert (workdir / "classifier" / "figures" / "cam_heatmaps.png").exists()
  for name in ("heatmaps.png", "heatmaps_raw.png"):  # axial / coronal / sagittal views
    png = workdir / "heatmaps" / "figures" / name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  source, meta = heatmap_stage.load_crops(workdir / "heatmaps")
  assert meta["strategy"] == "ten" and tuple(meta["positions"]) == crops.positions("ten")
  assert meta["image_size"] == [16, 16, 16] and meta["crop_size"] == [8, 8, 8]
  assert meta["heatmap_size"] == [2, 2, 2] and meta["heatmap_crop_size"] == [1, 1, 1]
  assert meta["stride"] == 8 and meta["num_crops"] == 10 * 32
  data = source.arrays
  assert data["image"].shape == (320, 8, 8, 8, 1) and data["image"].dtype == np.uint8
  assert data["heatmap"].shape == (320, 1, 1, 1, 1)
  assert (data["heatmap"] >= 0).all() and (data["heatmap"] <= 1).all()
  np.testing.assert_array_equal(data["position"], np.tile(np.arange(10), 32))
  # negative suppression: the crops of normal volumes carry zero heatmaps
  assert (data["heatmap"][data["label"] == 0] == 0).all()
  # a 3-D classifier has no torch reference network
  with pytest.raises(export.ExportError, match="no PyTorch reference"):
    export.export(workdir / "classifier", "torch", tmp_path)


@pytest.mark.xdist_group("camcontrast3d")
def test_tiny_3d_pipeline_pretrains_on_sub_volumes_and_fine_tunes(tiny_run):
  """Stage 2 on the 3-D crops and heatmap crops (standard3d augmentation), the linear probe
  and Table 11's fine-tuning from the pretrained encoder, all on volumes."""
  workdir = tiny_run("camcontrast3d")
  pre = json.loads((workdir / "pretrain" / "config.json").read_text())
  assert pre["augment"]["policy"] == "standard3d"
  assert pre["loss"]["objective"] == "image_heatmap"
  losses = [r["loss"] for r in _metrics(workdir / "pretrain") if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  probe = _metrics(workdir / "linear_eval")[-1]
  assert 0.0 <= probe["eval/auc_100pct"] <= 1.0
  loaded = (workdir / "finetune" / "init_from.txt").read_text()
  assert "encoder" in loaded and "loaded" in loaded
  ft = json.loads((workdir / "finetune" / "config.json").read_text())
  assert ft["augment"]["flip_p"] == 0.5 and ft["augment"]["rotate_degrees"] == 30.0
  final = [r for r in _metrics(workdir / "finetune") if r.get("split") == "eval"][-1]
  assert ft["train"]["eval_split"] == "test" and 0.0 <= final["eval/auc"] <= 1.0


def _metrics(stage_dir):
  return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_3d_config_rows_of_table_11():
  """variant=random is the fine-tuning stage alone; the -crop baselines keep every stage."""
  from conftest import config_module  # pylint: disable=g-import-not-at-top
  mod = config_module("camcontrast3d")
  random = mod.get_config("variant=random,size=tiny")
  assert list(random.stages) == ["finetune"] and not random.finetune.init_from
  supcon = mod.get_config("variant=supcon_crop,size=tiny,linear=none")
  assert list(supcon.stages) == ["classifier", "heatmaps", "pretrain", "finetune"]
  assert supcon.pretrain.loss.objective == "supcon"
  assert supcon.finetune.init_from == "stage:pretrain"
  paper = mod.get_config("size=paper,data=volume_folder")
  assert paper.pretrain.model.encoder == "resnet18_3d"
  assert (paper.pretrain.optim.lr, paper.pretrain.optim.weight_decay) == (1e-3, 1e-5)
  assert (paper.pretrain.train.batch_size, paper.pretrain.train.num_epochs) == (16, 120.0)
  assert (paper.finetune.train.batch_size, paper.finetune.train.num_epochs) == (8, 100.0)
  assert paper.finetune.optim.weight_decay == 1e-5
  assert mod.FINETUNE_LRS[0] == 1e-3 and mod.FINETUNE_LRS[-1] == 1e-1
