"""Using a trained run: medrep_jax.load (embed / predict / sample), predict and evaluate CLIs.

The equalities the issue asks for: `embed` equals the pretraining monitor's features,
`predict` equals the trainer's eval step, and `evaluate` on the run's own val split (also
read back from PNG files as another dataset) reproduces the run's final eval metrics.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import medrep_jax
from medrep_jax import config_lib, evaluate, inference, predict
from medrep_jax.core import runs
from medrep_jax.core.state import TrainState
from medrep_jax.data import imageio, registry
from medrep_jax.data.sources import DataError
from medrep_jax.train import trainer

from conftest import REPO_ROOT, load_config


def _train(name, arg, workdir):
  config = load_config(name, arg)
  with config.unlocked():
    config.data.num_examples = 32  # per split
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  return _train("finetune", "size=tiny,data=phantoms,task=segmentation",
                tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
  return _train("finetune", "size=tiny,data=phantoms", tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def dcl_run(tmp_path_factory):
  return _train("dcl_cstp", "size=tiny,data=phantoms", tmp_path_factory.mktemp("dcl"))


def _val(run_dir):
  """The val split of a run's data, as raw records (what a user has on disk)."""
  return registry.get_source(runs.load_run(run_dir).config.data, "val")


def _write_pngs(folder, images):
  folder.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0]).save(folder / f"img_{i:03d}.png")


def _eval_metrics(path):
  return {k: v for k, v in json.loads(path.read_text()).items() if k.startswith("eval/")}


# ------------------------------------------------------------------------------- embed
def test_embed_equals_the_pretraining_monitor_features(dcl_run):
  model = medrep_jax.load(dcl_run, batch_size=8)
  assert model.supports == ("embed",)
  stage, run = model.stage, model.trained.run
  state = TrainState(step=jnp.zeros((), jnp.int32), params=run.params, opt_state=None,
                     model_state=run.state["model_state"])
  monitor, _ = stage._features(state, "val", 0)  # what kNN / linear probe score
  source = _val(dcl_run)
  raw = [source[i]["image"] for i in range(len(source))]
  feats = model.embed(raw)
  assert feats.dtype == np.float32 and feats.shape == monitor.shape
  np.testing.assert_allclose(feats, monitor, rtol=1e-6, atol=1e-6)
  feats2, maps = model.embed(np.stack(raw[:3]), maps=True)
  np.testing.assert_array_equal(feats2, feats[:3])
  assert maps.ndim == 4 and maps.shape[0] == 3 and maps.shape[-1] == feats.shape[-1]
  # pooled = mean of the last map (ResNet GAP)
  np.testing.assert_allclose(maps.mean((1, 2)), feats2, rtol=1e-5, atol=1e-5)


def test_a_run_that_cannot_predict_says_what_it_supports(dcl_run):
  model = medrep_jax.load(dcl_run)
  with pytest.raises(ValueError, match=r"cannot predict; it supports: embed"):
    model.predict(np.zeros((1, 32, 32), np.uint8))
  with pytest.raises(ValueError, match="cannot sample"):
    model.sample(1)
  assert "dcl_cstp" in repr(model) and "embed" in repr(model)


# ----------------------------------------------------------------------------- predict
def test_predict_matches_the_eval_step(seg_run, tmp_path):
  run = runs.load_run(seg_run)
  tr = trainer.Trainer(run.config, tmp_path / "ev")
  try:
    with jax.set_mesh(tr.mesh):
      state = evaluate.restore_state(tr, run)
      outs = tr._eval_outputs(state)  # the trainer's own eval pass
  finally:
    tr.writer.close()
    tr.checkpointer.close()
  source = _val(seg_run)
  raw = np.stack([source[int(i)]["image"] for i in outs["index"]])
  model = medrep_jax.load(seg_run, batch_size=8)
  masks, probs = model.predict(raw, probs=True)
  assert masks.dtype == np.uint8 and masks.shape == outs["pred"].shape
  np.testing.assert_array_equal(masks, outs["pred"])
  assert probs.shape == (*masks.shape, 3)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # Another resolution: masks come back at each input's own size.
  big = imageio.resize_image(raw[0], (48, 40))
  got = model.predict([big, raw[1]])
  assert isinstance(got, list) and got[0].shape == (48, 40) and got[1].shape == (32, 32)
  np.testing.assert_array_equal(got[1], masks[1])


def test_predict_inputs_files_folders_dtypes_and_channels(seg_run, tmp_path):
  model = medrep_jax.load(seg_run, batch_size=8)
  source = _val(seg_run)
  raw = np.stack([source[i]["image"] for i in range(11)])  # 11: a padded last batch
  want = model.predict(raw)
  _write_pngs(tmp_path / "pngs", raw)
  np.testing.assert_array_equal(model.predict(tmp_path / "pngs"), want)
  np.testing.assert_array_equal(model.predict(str(tmp_path / "pngs" / "img_003.png")),
                                want[3:4])
  np.testing.assert_array_equal(
      model.predict([tmp_path / "pngs" / "img_001.png", raw[2]]), want[1:3])
  np.testing.assert_array_equal(model.predict(raw[..., 0]), want)  # (N, H, W) grey
  unit = raw.astype(np.float32) * np.float32(1 / 255)  # float in [0, 1]
  np.testing.assert_array_equal(model.predict(unit), want)
  rgb = np.repeat(raw, 3, axis=-1)  # colour input to a grey run: converted (luma)
  np.testing.assert_array_equal(model.predict(rgb), want)
  with pytest.raises(DataError, match=r"shape \(32, 32, 5\)"):
    model.predict(np.zeros((1, 32, 32, 5), np.uint8))
  with pytest.raises(ValueError, match="shape"):
    model.predict(np.zeros((1, 2, 32, 32, 1), np.uint8))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty"):
    model.predict(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="missing.png"):
    model.predict(tmp_path / "missing.png")


def test_info_and_errors(seg_run, tmp_path):
  model = medrep_jax.load(seg_run)
  info = model.info()
  assert info["method"] == "finetune" and info["task"] == "segmentation"
  assert info["supports"] == ["embed", "predict"]
  assert (info["image_size"], info["channels"]) == (32, 1)
  assert info["classes"] == ["class_0", "class_1", "class_2"]
  with pytest.raises(ValueError, match="cannot sample; it supports: embed, predict"):
    model.sample(2)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    medrep_jax.load(tmp_path / "nowhere")


def test_classifier_probabilities_and_csv(cls_run, tmp_path):
  model = medrep_jax.load(cls_run)
  assert model.task == "classification" and len(model.classes) == 3
  source = _val(cls_run)
  raw = np.stack([source[i]["image"] for i in range(5)])
  probs = model.predict(raw)
  assert probs.shape == (5, 3) and probs.dtype == np.float32
  assert np.all((probs >= 0) & (probs <= 1))  # sigmoid: the run's loss is BCE (eq. 8)
  _write_pngs(tmp_path / "in", raw)
  assert predict.main(["--workdir", str(cls_run), "--input", str(tmp_path / "in"),
                       "--output", str(tmp_path / "out"), "--no_progress"]) == 0
  rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
  assert rows[0].split(",") == ["file", "predicted", *model.classes]
  assert len(rows) == 6 and rows[1].startswith("img_000.png,")
  got = np.array([[float(v) for v in r.split(",")[2:]] for r in rows[1:]])
  np.testing.assert_allclose(got, probs, atol=1e-6)
  assert [r.split(",")[1] for r in rows[1:]] == [model.classes[k] for k in probs.argmax(1)]


def test_embeddings_cli(dcl_run, tmp_path):
  source = _val(dcl_run)
  raw = np.stack([source[i]["image"] for i in range(4)])
  _write_pngs(tmp_path / "in", raw)
  assert predict.main(["--workdir", str(dcl_run), "--input", str(tmp_path / "in"),
                       "--output", str(tmp_path / "out"), "--no_progress"]) == 0
  feats = np.load(tmp_path / "out" / "embeddings.npy")
  np.testing.assert_allclose(feats, medrep_jax.load(dcl_run).embed(raw), atol=1e-6)
  assert (tmp_path / "out" / "files.txt").read_text().split() == [
      f"img_{i:03d}.png" for i in range(4)]


def test_predict_cli_writes_masks_and_overlays(seg_run, tmp_path):
  source = _val(seg_run)
  raw = np.stack([source[i]["image"] for i in range(3)])
  _write_pngs(tmp_path / "in", raw)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "medrep_jax.predict", f"--workdir={seg_run}",
       f"--input={tmp_path / 'in'}", f"--output={out}", "--batch_size=2"],
      cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr
  want = medrep_jax.load(seg_run).predict(raw)
  for i in range(3):
    mask = np.asarray(Image.open(out / f"img_{i:03d}_mask.png"))
    np.testing.assert_array_equal(mask, want[i])  # 3 classes: ids as stored
    overlay = np.asarray(Image.open(out / f"img_{i:03d}_overlay.png"))
    assert overlay.shape == (32, 32, 3)
  bad = subprocess.run(
      [sys.executable, "-m", "medrep_jax.predict", f"--workdir={tmp_path / 'norun'}",
       f"--input={tmp_path / 'in'}", f"--output={out}"],
      cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ))
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert str(tmp_path / "norun") in bad.stderr


# ---------------------------------------------------------------------------- evaluate
def test_evaluate_reproduces_the_final_eval_metrics(seg_run, dcl_run):
  for run_dir in (seg_run, dcl_run):
    final = evaluate.evaluate_run(run_dir)
    name = "eval_phantoms_val"
    assert final["report"] == str(run_dir / name / "report.md")
    want = _eval_metrics(run_dir / "done.json")
    assert want and _eval_metrics(run_dir / name / "metrics.json") == want
  assert (seg_run / name / "figures" / "segmentation_overlays.png").exists()
  assert "without training" in (seg_run / name / "report.md").read_text()


def test_evaluate_cli_on_another_dataset(seg_run, tmp_path):
  """The val split written as an image+mask folder: the same images, read as a new
  dataset through the generic reader, score exactly what the run's final eval scored."""
  source = _val(seg_run)
  _write_pngs(tmp_path / "ext" / "images", [source[i]["image"] for i in range(len(source))])
  (tmp_path / "ext" / "masks").mkdir()
  for i in range(len(source)):
    Image.fromarray(source[i]["mask"]).save(tmp_path / "ext" / "masks" / f"img_{i:03d}.png")
  cmd = [sys.executable, "-m", "medrep_jax.evaluate", f"--workdir={seg_run}",
         "--config.data.name=image_mask_folder", f"--config.data.root={tmp_path / 'ext'}",
         "--config.data.mask_threshold=-1", "--split=all", "--name=ext"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                        env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr
  out = seg_run / "eval_ext"
  assert _eval_metrics(out / "metrics.json") == _eval_metrics(seg_run / "done.json")
  config = json.loads((out / "config.json").read_text())
  assert config["data"]["name"] == "image_mask_folder" and config["data"]["image_size"] == 32
  assert (out / "report.md").exists() and not (out / "checkpoints").exists()
  bad = subprocess.run(cmd[:4] + ["--config.optim.lr=1.0", "--name=bad"], cwd=REPO_ROOT,
                       capture_output=True, text=True, env=dict(os.environ))
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "optim.lr" in bad.stderr and not (seg_run / "eval_bad").exists()
  # Thresholded (binary) masks build a 1-channel head: the mismatch names the array.
  with pytest.raises(ValueError, match=r"params/decoder/logits/\w+ has shape \(3,?.*builds"):
    evaluate.evaluate_run(seg_run, {"data.name": "image_mask_folder",
                                    "data.root": str(tmp_path / "ext")}, name="binary")
  assert not (seg_run / "eval_binary").exists()


def test_eval_config_overrides():
  run_config = load_config("finetune", "size=tiny,data=phantoms,task=segmentation")
  with pytest.raises(config_lib.ConfigError, match=r"optim\.lr.*data\.\*"):
    evaluate.eval_config(run_config, {"optim.lr": 1.0})
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'root'"):
    evaluate.eval_config(run_config, {"data.rooot": "/x"})
  cfg = evaluate.eval_config(run_config, {"data.name": "kvasir_seg", "data.root": "/x",
                                          "train.max_eval_examples": 4}, split="test")
  assert (cfg.data.name, cfg.data.root, cfg.data.mask_threshold) == ("kvasir_seg", "/x", 127)
  assert (cfg.data.image_size, cfg.data.channels) == (32, 0)  # the model's preprocessing
  assert (cfg.train.eval_split, cfg.train.max_eval_examples) == ("test", 4)
  assert run_config.data.name == "phantoms"  # the run's config is not changed
  assert evaluate.parse_overrides(["--config.data.root=/a", "--config.train.eval_batch_size",
                                   "16"]) == {"data.root": "/a",
                                              "train.eval_batch_size": 16}


def test_load_is_lazy():
  code = ("import sys, medrep_jax; assert 'medrep_jax.inference' not in sys.modules; "
          "from medrep_jax import load; import medrep_jax.inference as i; "
          "assert load is i.load; print('ok')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                        text=True)
  assert proc.stdout.strip() == "ok", proc.stderr
  assert medrep_jax.load is inference.load


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline_dcl_cstp")  # the ldm stages of test_cli's tiny run
def test_sample_from_the_latent_diffusion_run(tiny_run):
  model = medrep_jax.load(tiny_run("pipeline_dcl_cstp") / "unet")
  assert model.supports == ("sample",)
  images = model.sample(3, num_steps=2)
  assert images.shape == (3, 16, 16, 1) and images.min() >= 0 and images.max() <= 1
  np.testing.assert_array_equal(model.sample(3, num_steps=2), images)  # seeded
  assert not np.array_equal(model.sample(3, seed=1, num_steps=2), images)
  with pytest.raises(ValueError, match="cannot predict; it supports: sample"):
    model.predict(np.zeros((1, 16, 16), np.uint8))


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline_camcontrast")  # shares the cached run with test_cli
def test_camcontrast_classifier_predicts_coarse_classes(tiny_run):
  root = tiny_run("pipeline_camcontrast")
  model = medrep_jax.load(root / "classifier")
  assert model.supports == ("embed", "predict") and model.classes == ("normal", "abnormal")
  source = _val(root / "classifier")
  probs = model.predict(np.stack([source[i]["image"] for i in range(4)]))
  assert probs.shape == (4, 2)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)  # softmax (eq. 2)
  final = evaluate.evaluate_run(root / "classifier")  # through the stage's eval step
  assert _eval_metrics(root / "classifier" / "eval_phantoms_val" / "metrics.json") == \
      _eval_metrics(root / "classifier" / "done.json")
  assert final["step"] == runs.load_run(root / "classifier").step
  assert "embed" in medrep_jax.load(root / "pretrain").supports


def test_config_records_what_the_data_gave_and_load_needs_no_data(tmp_path):
  """config.json holds the classes and channels the data gave (the config left them to
  the data), a re-run is not taken for a changed config, and a finished run loads and
  predicts after its data folder is gone."""
  source = registry.get_source(registry.data_config("phantoms", num_examples=12,
                                                    image_size=32), "train")
  data_root = tmp_path / "data"
  for i in range(len(source)):
    record = source[i]
    folder = data_root / ("lesion" if record["label"] else "normal")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(record["image"], 3, -1)).save(folder / f"{i:03d}.png")
  config = load_config("finetune", "size=tiny")
  with config.unlocked():
    config.data = registry.data_config("image_folder", root=str(data_root), image_size=32,
                                       channels=0, num_classes=0, val_fraction=0.25,
                                       test_fraction=0.0)
  run = tmp_path / "run"
  trainer.train_and_evaluate(config, run)
  saved = json.loads((run / "config.json").read_text())
  assert saved["data"]["num_classes"] == 2 and saved["data"]["channels"] == 3
  assert saved["data"]["class_names"] == ["lesion", "normal"]
  assert saved["data_info"]["num_classes"] == 2 and saved["data_info"]["channels"] == 3
  assert saved["data_info"]["image_shape"] == [32, 32, 3]
  assert saved["data_info"]["train_examples"] == 9  # 12 less the 25% val split
  again = load_config("finetune", "size=tiny")
  with again.unlocked():
    again.data = config.data.copy_and_resolve_references()
    again.data.update(dict(num_classes=0, channels=0, class_names=()))
  trainer.train_and_evaluate(again, run)  # "already finished", not "config changed"
  images = np.stack([np.repeat(source[i]["image"], 3, -1) for i in range(4)])
  want = medrep_jax.load(run).predict(images)
  data_root.rename(tmp_path / "moved")
  model = medrep_jax.load(run)
  assert model.info()["classes"] == ["lesion", "normal"]
  np.testing.assert_array_equal(model.predict(images), want)
