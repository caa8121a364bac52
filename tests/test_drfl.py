"""DRFL method: eq. 1-7 against NumPy, the schedule, the ladder configs, the teacher's
cached SR targets, the sharded step, and inference on a trained run (tiny, phantoms)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from PIL import Image

import medrep_jax
from medrep_jax import methods, predict
from medrep_jax.core import optim
from medrep_jax.losses import drfl as drfl_losses
from medrep_jax.methods.drfl_parts import common
from medrep_jax.train import pipeline

from conftest import config_module, one_step, tiny_config

drfl_cfg = config_module("drfl")


def _tiny(variant="drfl", **kw):
  c = drfl_cfg.drfl_config(variant=variant, size="tiny", data="phantoms", **kw)
  c.data.num_examples = 16
  c.train.progress = False
  return c


# ------------------------------------------------------------------------------ losses
def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_seg(logits, mask):
  """Eq. 1-3 for one output channel: pixel-mean BCE + soft Dice (smooth 1), batch mean."""
  p = _np_sigmoid(logits[..., 0].astype(np.float64))
  bce = -(mask * np.log(p) + (1 - mask) * np.log(1 - p)).mean()
  inter, sums = (p * mask).sum((1, 2)), p.sum((1, 2)) + mask.sum((1, 2))
  return bce + np.mean(1 - (2 * inter + 1) / (sums + 1))


@pytest.fixture(scope="module")
def outputs():
  rng = np.random.default_rng(0)
  mask = (rng.random((2, 8, 8)) > 0.6).astype(np.float32)
  out = {"p_bin": rng.normal(size=(2, 8, 8, 1)).astype(np.float32) * 2,
         "p_sr": rng.random((2, 16, 16, 1)).astype(np.float32),
         "p_fusion": rng.normal(size=(2, 8, 8, 1)).astype(np.float32)}
  return out, mask, rng.random((2, 16, 16, 1)).astype(np.float32)


def test_every_loss_term_matches_numpy(outputs):
  out, mask, target = outputs
  seg, fus = _np_seg(out["p_bin"], mask), _np_seg(out["p_fusion"], mask)
  sr = np.abs(out["p_sr"].astype(np.float64) - target).mean()  # eq. 4
  np.testing.assert_allclose(drfl_losses.seg_loss(out["p_bin"], mask), seg, rtol=1e-5)
  np.testing.assert_allclose(drfl_losses.sr_loss(out["p_sr"], target), sr, rtol=1e-5)
  loss, terms = drfl_losses.drfl_loss(out, mask, target)  # eq. 7, λ = γ = 1
  np.testing.assert_allclose(loss, sr + seg + fus, rtol=1e-5)
  np.testing.assert_allclose(terms["loss_fusion"], fus, rtol=1e-5)
  loss, _ = drfl_losses.drfl_loss(out, mask, target, lam=0.5, gamma=2.0, seg_weight=10.0)
  np.testing.assert_allclose(loss, 0.5 * (sr + 10 * seg) + 2.0 * 10 * fus, rtol=1e-5)
  # Terms follow the streams that are on: SS has L_seg only, SS+SRS adds L_sr.
  loss, terms = drfl_losses.drfl_loss({"p_bin": out["p_bin"]}, mask)
  assert set(terms) == {"loss_seg"}
  np.testing.assert_allclose(loss, seg, rtol=1e-5)
  loss, _ = drfl_losses.drfl_loss({"p_bin": out["p_bin"], "p_sr": out["p_sr"]}, mask, target)
  np.testing.assert_allclose(loss, seg + sr, rtol=1e-5)
  with pytest.raises(ValueError, match="SR target"):
    drfl_losses.drfl_loss(out, mask, None)


def test_paper_schedule_and_recipe():
  c = drfl_cfg.drfl_config(size="paper")
  assert (c.optim.name, c.optim.lr, c.optim.b1) == ("adam", 2e-4, 0.9)
  assert c.train.num_epochs == 60 and c.loss.seg_weight == 1.0
  schedule = optim.make_schedule(c.optim, 600)
  assert float(schedule(299)) == pytest.approx(2e-4) and float(schedule(600)) == 0.0
  np.testing.assert_allclose(float(schedule(450)), 1e-4, rtol=1e-5)
  code = drfl_cfg.drfl_config(size="paper", recipe="code")
  assert code.optim.b1 == 0.5 and code.loss.seg_weight == 10.0


def test_flip_rotate_moves_image_mask_and_target_alike():
  x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1)
  batch = {"image": x, "mask": x[..., 0].astype(jnp.int32), "sr": common.bicubic_2x(x / 32)}
  out = common.flip_rotate(jax.random.key(3), batch)
  np.testing.assert_array_equal(out["image"][..., 0], out["mask"])
  np.testing.assert_allclose(out["sr"], common.bicubic_2x(out["image"] / 32), atol=1e-5)


# ---------------------------------------------------------------- ladder: one step each
def _terms(variant):
  return {"loss_seg"} | ({"loss_sr"} if variant not in ("unet", "ss") else set()) | (
      {"loss_fusion"} if variant.startswith("dfm") or variant == "drfl" else set())


# `drfl` trains in the sharded test and in the shared pipeline run below; the RFTM of
# `dfm_rftm` runs in both attention variants.
@pytest.mark.parametrize("variant", ["unet", "ss", "ss_srs", "dfm", "dfm_rftm_cbam"])
def test_every_variant_takes_a_step_with_its_loss_terms(variant, tmp_path):
  config = _tiny(variant, sr_target="bicubic")
  config.train.batch_size = 2
  _, _, metrics = one_step(config, jax.devices()[:1], tmp_path)
  assert {k for k in metrics if k.startswith("loss_")} == _terms(variant)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_sharded_drfl_step_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  config = _tiny("drfl", sr_target="bicubic")
  config.optim.name = "sgd"  # Adam's first step is lr*sign(g): it amplifies fp32 noise
  p1, s1, m1 = one_step(config, jax.devices()[:1], tmp_path / "one")
  p8, s8, m8 = one_step(config, jax.devices(), tmp_path / "eight")
  assert {k for k in m1 if k.startswith("loss_")} == _terms("drfl")
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p8, s8))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------- teacher -> train, shared by the tests below
# tests/test_cli.py's tiny `pipeline_drfl` run (teacher -> drfl -> table), trained once on
# the worker of the xdist group.
@pytest.fixture(scope="module")
def pipeline_run(tiny_run):
  return tiny_config("pipeline_drfl"), tiny_run("pipeline_drfl")


@pytest.mark.xdist_group("pipeline_drfl")
def test_teacher_caches_2x_targets_and_a_rerun_reuses_them(pipeline_run):
  config, workdir = pipeline_run
  cache = workdir / "teacher" / common.CACHE_NAME
  size = config.teacher.data.image_size
  stage_cfg = pipeline.resolve_stage_refs(config.drfl, workdir, ["teacher"])
  stage = methods.load_method(stage_cfg)
  stage.workdir = workdir / "drfl"
  source = stage.make_source("train")
  with np.load(cache) as f:
    assert f["sr"].shape == (len(source), 2 * size, 2 * size, 1)
  stamp = cache.stat().st_mtime_ns
  pipeline.run_pipeline(config, workdir)  # finished stages are skipped
  assert cache.stat().st_mtime_ns == stamp
  # The train stage reads the cache (no copy in its own workdir), aligned with the images.
  assert source[0]["sr"].shape == (2 * size, 2 * size, 1)
  assert not (workdir / "drfl" / common.CACHE_NAME).exists()
  train = [json.loads(l) for l in (workdir / "drfl" / "metrics.jsonl").read_text().splitlines()]
  assert _terms("drfl") <= set(train[0])
  report = (workdir / "teacher" / "report.md").read_text()
  assert "teacher_sr.png" in report
  table = json.loads((workdir / "table" / "done.json").read_text())
  assert {"drfl/dice", "drfl/pixel_accuracy", "drfl/gflops"} <= set(table)
  assert table["drfl/gflops"] > 0


@pytest.mark.xdist_group("pipeline_drfl")
def test_load_predict_returns_masks_at_the_input_size(pipeline_run):
  _, workdir = pipeline_run
  model = medrep_jax.load(workdir / "drfl")
  images = np.random.default_rng(0).random((3, 40, 48, 1)).astype(np.float32)
  masks = model.predict(images)
  assert masks.shape == (3, 40, 48) and masks.dtype == np.uint8
  report = (workdir / "drfl" / "report.md").read_text()
  assert "segmentation_overlays.png" in report and "sr_stream.png" in report


@pytest.mark.xdist_group("pipeline_drfl")
def test_predict_command_writes_fusion_masks_and_overlays(pipeline_run, tmp_path):
  """`python -m medrep_jax.predict` on a DRFL run writes the p_fusion masks and overlays."""
  _, workdir = pipeline_run
  raw = np.random.default_rng(1).integers(0, 256, (3, 40, 48), dtype=np.uint8)
  (tmp_path / "in").mkdir()
  for i, image in enumerate(raw):
    Image.fromarray(image).save(tmp_path / "in" / f"ct_{i}.png")
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir / "drfl"), "--input", str(tmp_path / "in"),
                       "--output", str(out)]) == 0
  model = medrep_jax.load(workdir / "drfl")
  want = model.predict(tmp_path / "in")
  scale = 255 if len(model.classes) <= 2 else 1  # binary: 0/255; more classes: the ids
  for i in range(3):
    mask = np.asarray(Image.open(out / f"ct_{i}_mask.png"))
    np.testing.assert_array_equal(mask, want[i] * scale)
    assert np.asarray(Image.open(out / f"ct_{i}_overlay.png")).shape == (40, 48, 3)
