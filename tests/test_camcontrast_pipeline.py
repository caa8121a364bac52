"""CAMContrast end to end (tiny pipeline on phantoms), the variants' wiring and bad input."""
import json

import jax
import numpy as np
import pytest

from medrep_jax.data import loader
from medrep_jax.methods import load_method
from medrep_jax.methods.camcontrast_parts import heatmap_stage
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.train import trainer

from conftest import config_module, load_config

VARIANTS = config_module("camcontrast").VARIANTS
stage_config = config_module("camcontrast").stage_config


@pytest.mark.xdist_group("pipeline_camcontrast")  # shares the cached run with test_cli
def test_tiny_pipeline_end_to_end(tiny_run):
  workdir = tiny_run("pipeline_camcontrast")
  stages = ("classifier", "heatmaps", "pretrain", "linear_eval", "finetune_seg")
  for s in stages:
    assert (workdir / s / "done.json").exists(), s
  assert (workdir / "classifier" / "figures" / "cam_heatmaps.png").exists()
  assert (workdir / "heatmaps" / "figures" / "heatmaps.png").exists()
  source, meta = heatmap_stage.load_crops(workdir / "heatmaps")
  assert meta["strategy"] == "five" and meta["stride"] == 2
  assert len(source) == 5 * 32  # five crops per image
  rec = source[7]
  assert rec["image"].shape == (8, 8, 1) and rec["image"].dtype == np.uint8
  assert rec["heatmap"].shape == (4, 4, 1) and 0 <= rec["heatmap"].min() <= 1
  assert rec["position"] == 2 and rec["source_index"] == 1
  normal = source.arrays["label"] == 0
  assert normal.any() and not source.arrays["heatmap"][normal].any()  # negative suppression
  np.testing.assert_array_equal(source.arrays["label"], source.arrays["source_label"] != 0)
  lin = json.loads((workdir / "linear_eval" / "done.json").read_text())
  assert {"auc_25pct", "auc_100pct"} <= set(lin)
  assert (workdir / "linear_eval" / "figures" / "embedding_tsne.png").exists()
  assert "embedding_tsne.png" in (workdir / "linear_eval" / "report.md").read_text()
  init = (workdir / "finetune_seg" / "init_from.txt").read_text()
  assert "params/encoder/level1/conv1/kernel" in init.split("# new")[0]
  assert "| heatmaps | train/num_crops | 160 |" in (workdir / "report.md").read_text()


@pytest.fixture(scope="module")
def fake_crops(tmp_path_factory):
  """A crop dataset written by `write_crops` from random 16 px images (no stage 1 needed)."""
  d = tmp_path_factory.mktemp("crops")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 16, 16, 1)).astype(np.uint8)
  meta = heatmap_stage.write_crops(d, "train", images, rng.uniform(size=(8, 8, 8)),
                                   np.arange(8) % 3, np.arange(8), strategy="five")
  assert meta["num_crops"] == 40 and meta["stride"] == 2
  return d


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "random"])
def test_variants_wire_their_objective(variant, fake_crops, tmp_path):
  config = stage_config("pretrain", variant=variant, data="phantoms", size="tiny")
  config.data.num_examples = 16
  config.crops_from = str(fake_crops)
  t = trainer.Trainer(config, tmp_path, devices=jax.devices()[:1])
  source = t.method.make_source("train")
  if hasattr(source, "arrays"):  # the crop dataset: coarse labels of the source images
    np.testing.assert_array_equal(source.arrays["label"][::5], np.arange(8) % 3 != 0)
  ds = loader.train_dataset(source, t.method.transforms("train"), global_batch=8, seed=0)
  with jax.set_mesh(t.mesh):
    batch = mesh_lib.to_global(ds[0], t.mesh)
    state = jax.eval_shape(t.method.init_state, jax.random.key(0), batch)
    _, metrics = jax.eval_shape(t.method.train_step, state, batch, jax.random.key(1))
  keys = set(state.params)
  assert "encoder" in keys and metrics["loss"].shape == ()
  assert ("heatmap_encoder" in keys) == (variant == "camcontrast")
  assert ("head" in keys) == variant.startswith("supce")
  assert ("heatmap" in batch) == variant.endswith(("_crop", "camcontrast"))
  if "heatmap" in batch:
    assert batch["image"].shape == (8, 8, 8, 1) and batch["heatmap"].shape == (8, 4, 4, 1)
  else:  # whole 16 px images, cut to random 8 px crops on device
    assert batch["image"].shape == (8, 16, 16, 1)


def test_bad_input_raises_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="classifier_from is empty"):
    load_method(stage_config("heatmaps", data="phantoms", size="tiny"), tmp_path).run()
  c = stage_config("pretrain", data="phantoms", size="tiny")
  c.crops_from = str(tmp_path)
  with pytest.raises(ValueError, match="no crop dataset"):
    load_method(c).make_source("train")
  c.data_source = "images"
  with pytest.raises(ValueError, match="needs heatmaps"):
    load_method(c)
  with pytest.raises(ValueError, match="variant="):
    load_config("camcontrast", "variant=simclr_crops")
  with pytest.raises(ValueError, match="stage="):
    load_method(stage_config("heatmap", size="tiny"))
  with pytest.raises(ValueError, match="encoder_from is empty"):
    load_method(stage_config("linear_eval", data="phantoms", size="tiny"), tmp_path).run()


def test_ablation_switches_and_protocols_are_configs():
  c = load_config("camcontrast", "size=tiny,data=phantoms,attention=False,weighted=False,"
                  "negative_suppression=False,background_suppression=False,"
                  "discard_negatives=True,crop=four")
  assert c.stages == ("classifier", "heatmaps", "pretrain")
  assert c.classifier.loss.attention_weight == 0.0
  h = c.heatmaps.heatmap
  assert (h.weighted, h.negative_suppression, h.background_suppression,
          h.discard_negatives) == (False, False, False, True)
  assert c.heatmaps.crops.strategy == "four" and c.pretrain.crops_from == "stage:heatmaps"
  assert load_config("camcontrast", "size=tiny,variant=supcon").stages == ("pretrain",)
  reuse = load_config("camcontrast", "size=tiny,crops_from=/x/heatmaps")
  assert reuse.stages == ("pretrain",) and reuse.pretrain.crops_from == "/x/heatmaps"
  p = load_config("pipeline_camcontrast", "size=tiny,data=phantoms,linear=finetune")
  assert p.stages[-3:] == ("linear_25pct", "linear_100pct", "finetune_seg")
  lin = p.linear_25pct
  assert lin.freeze_encoder and lin.label_fraction == 0.25 and lin.init_from == "stage:pretrain"
  assert tuple(lin.model.unet_widths) == tuple(p.pretrain.model.unet_widths)
  assert p.finetune_seg.model.decoder_widths == (8,)


def test_stage2_loss_pairs_each_augmented_crop_with_its_heatmap(fake_crops, tmp_path):
  """The camcontrast objective is eq. 5 on (g_I(f_I(t(x_i))), g_h(f_h(h(x_i)))) pairs."""
  from medrep_jax.data import augment
  from medrep_jax.methods.camcontrast_parts.pretrain_stage import PretrainNet
  config = stage_config("pretrain", data="phantoms", size="tiny")
  config.crops_from = str(fake_crops)
  method = trainer.Trainer(config, tmp_path, devices=jax.devices()[:1]).method
  source = method.make_source("train")
  batch = loader.collect(source, method.transforms("train"), limit=8, batch_size=8)
  batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  state = method.init_state(jax.random.key(0), batch)

  @jax.jit
  def loss_and_pairs(state, batch, rng):
    loss, _ = method.loss(state.params, state.model_state, batch, batch["image"],
                          batch["heatmap"], rng)
    v = augment.augment_batch("standard", rng, batch["image"], indices=batch["index"])
    (z1, z2), _ = method.model.apply(state.variables(), v, batch["heatmap"], True,
                                   method=PretrainNet.pair, mutable=["batch_stats"])
    return loss, z1, z2

  loss, z1, z2 = loss_and_pairs(state, batch, jax.random.key(5))
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = np.exp(z @ z.T / 0.05)
  b = 8
  pos = np.concatenate([np.arange(b, 2 * b), np.arange(b)])
  ref = np.mean([-np.log(sim[i, pos[i]] / (sim[i].sum() - sim[i, i])) for i in range(2 * b)])
  assert float(loss) == pytest.approx(ref, rel=1e-4)


def test_heatmap_stats_locate_the_mass():
  """Foreground and centre-box shares of heatmap mass, per coarse class, on hand-made maps."""
  raw = np.zeros((2, 8, 8), np.float32)
  raw[0, 2:6, 2:6] = 1.0  # all mass inside the centre crop's box
  raw[1, 0, 0] = 1.0  # all mass in a corner
  fg = np.ones_like(raw)
  fg[1, 0, :] = 0.0  # the corner is background
  got = {"logits": np.array([[0.0, 1.0], [1.0, 0.0]]), "label": np.array([1, 0])}
  stats = heatmap_stage._stats(got, np.array([1, 0]), {"raw": raw, "foreground": fg}, "val")
  assert stats["val/classifier_accuracy"] == 1.0
  assert stats["val/heat_in_centre_abnormal"] == pytest.approx(1.0)
  assert stats["val/heat_in_centre_normal"] == pytest.approx(0.0)
  assert stats["val/peak_in_centre_abnormal"] == 1.0 and stats["val/peak_in_centre_normal"] == 0.0
  assert stats["val/heat_in_foreground_abnormal"] == pytest.approx(1.0)
  assert stats["val/heat_in_foreground_normal"] == pytest.approx(0.0)
  assert stats["val/foreground_fraction"] == pytest.approx(1 - 8 / 128)


def test_linear_eval_sgd_protocol_picks_the_lr_on_val_and_draws_tsne(monkeypatch, tmp_path):
  """protocol=sgd: the LR is chosen on the val split (never the scored test split); the
  stage reports the chosen LR, each LR's val accuracy, test scores and the t-SNE figure."""
  from medrep_jax import methods
  from medrep_jax.eval import probes
  # A stand-in frozen encoder: flattened pixels (no pretraining run needed).
  monkeypatch.setattr(methods, "feature_net",
                      lambda *a, **k: lambda x: np.asarray(x, np.float32).reshape(len(x), -1))
  seen = []
  real = probes.sgd_linear_probe

  def spy(train_x, train_y, val_x, val_y, **kw):
    seen.append(np.asarray(val_x))
    return real(train_x, train_y, val_x, val_y, **kw)

  monkeypatch.setattr(probes, "sgd_linear_probe", spy)
  c = stage_config("linear_eval", data="phantoms", size="tiny")
  c.data.num_examples = 48
  c.encoder_from = "unused"
  c.eval.protocol = "sgd"
  stage = load_method(c, tmp_path)
  result = stage.run()
  val = loader.collect(stage.make_source("val"), stage.transforms("val"))["image"]
  test = loader.collect(stage.make_source("test"), stage.transforms("test"))["image"]
  assert len(seen) == len(c.eval.label_fractions)
  for v in seen:
    np.testing.assert_array_equal(v, val.reshape(len(val), -1))
  assert not np.array_equal(val, test)
  m = result.metrics
  for name in ("25pct", "100pct"):
    assert m[f"lr_{name}"] in (0.1, 1.0)
    assert {f"val_accuracy_{name}_lr0.1", f"val_accuracy_{name}_lr1"} <= set(m)
    assert 0.0 <= m[f"auc_{name}"] <= 1.0
  assert any("chosen on the `val` split" in line for line in result.lines)
  assert result.figures == {"t-SNE of frozen features": "figures/embedding_tsne.png"}
  assert (tmp_path / "figures" / "embedding_tsne.png").exists()
  c.eval.val_split = "test"
  with pytest.raises(ValueError, match="must not be the scored"):
    load_method(c, tmp_path).run()
