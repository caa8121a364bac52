"""The pre-flight's shape check: every training stage's model is traced abstractly on the
batch it will be fed (`base.Method.check_shapes`), so an image size the network cannot
take fails in seconds, naming the stage and its fields, before any stage runs."""
import pathlib

import pytest

from medrep_jax import config_lib, methods
from medrep_jax.methods import base
from medrep_jax.train import pipeline, trainer

from conftest import REPO_ROOT, tiny_config

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))


def _contents(path: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture
def traced(monkeypatch):
  """The stages whose shapes the pre-flight traced (type names, in order)."""
  seen = []
  original = base.Method.shape_error

  def shape_error(self, batch):
    seen.append(type(self).__name__)
    return original(self, batch)

  monkeypatch.setattr(base.Method, "shape_error", shape_error)
  return seen


@pytest.mark.parametrize("name", CONFIGS)
def test_every_tiny_config_passes_the_shape_preflight(name, traced, tmp_path):
  """The tiny configs the suite runs fit: the check raises on none of them, and it traces
  at least their first training stage (later ones may read an earlier stage's output)."""
  config = tiny_config(name)
  if pipeline.is_pipeline(config):
    pipeline.preflight(config, tmp_path)
  else:
    methods.load_method(config, workdir=tmp_path).preflight({})
  assert traced, f"{name}: no stage's shapes were traced"


def _set(config, **fields):
  with config.unlocked():
    for key, value in fields.items():
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
  return config


def test_unet_deeper_than_its_image_fails_before_training(tmp_path):
  """A U-Net segmentation fine-tune whose encoder pools a 16 px image to nothing (its
  decoder resizes every skip, so only depth breaks it): a ConfigError from the trainer's
  pre-flight with the fields and the sizes that fit; the workdir stays empty."""
  config = _set(tiny_config("finetune"), task="segmentation", loss="iou_bce",
                **{"data.image_size": 16, "model.encoder": "unet_encoder",
                   "model.unet_widths": (8, 8, 8, 8, 8, 8)})
  with pytest.raises(config_lib.ConfigError) as e:
    trainer.train_and_evaluate(config, tmp_path / "run")
  message = str(e.value)
  for part in ("data.image_size=16", "model.encoder='unet_encoder'",
               "model.unet_widths=(8, 8, 8, 8, 8, 8)", "image (8, 16, 16, 1)",
               "shrinks to size 0", "sizes that fit: 32 or 64"):
    assert part in message, message
  assert not _contents(tmp_path / "run")


def test_vae_size_not_divisible_fails_before_any_stage_runs(tmp_path):
  """The LDM pipeline's VAE at 18 px (its factor is 4): stage 1/4 fails the pipeline
  pre-flight, naming the VAE's rule and the nearest sizes; nothing is written."""
  config = _set(tiny_config("ldm"), **{"vae.data.image_size": 18})
  with pytest.raises(config_lib.ConfigError,
                     match=r"pre-flight, stage 1/4 'vae' .*data\.image_size=18.*"
                           r"divisible by 4.*must be a multiple of 4: set it to 16 or 20"):
    pipeline.run_pipeline(config, tmp_path / "run")
  assert not _contents(tmp_path / "run")


def test_drfl_patch_that_does_not_divide_fails_before_the_teacher_trains(tmp_path):
  """DRFL's RFTM cuts the H/2 map into patches: 40 px with patch 8 fails in the pipeline
  pre-flight of the DRFL stage (its teacher, pending, is described from the config), not
  after the teacher stage; and the single-stage run fails before it writes."""
  config = tiny_config("pipeline_drfl")
  _set(config, **{"drfl.data.image_size": 40, "drfl.model.patch_size": 8})
  with pytest.raises(config_lib.ConfigError,
                     match=r"stage 2/3 'drfl' .*data\.image_size=40.*model\.patch_size=8.*"
                           r"patch_size=8 does not divide.*sizes that fit: 32 or 48"):
    pipeline.run_pipeline(config, tmp_path / "run")
  assert not _contents(tmp_path / "run")
  single = _set(tiny_config("drfl"), **{"data.image_size": 36})
  with pytest.raises(config_lib.ConfigError,
                     match=r"multiple of 8.*must be a multiple of 8: set it to 32 or 40"):
    trainer.train_and_evaluate(single, tmp_path / "single")
  assert not _contents(tmp_path / "single")


def test_camcontrast_crops_that_cannot_halve_the_heatmap_fail_before_stage_1(tmp_path):
  """CAMContrast's fixed crops halve the classifier's heatmap: at 18 px the tiny encoder
  (stride 2) gives a 9 x 9 heatmap, so the heatmaps stage fails the pipeline pre-flight,
  before the stage-1 classifier trains, naming the sizes that fit."""
  config = _set(tiny_config("camcontrast"),
                **{f"{s}.data.image_size": 18 for s in ("classifier", "heatmaps", "pretrain")})
  with pytest.raises(config_lib.ConfigError,
                     match=r"stage 2/3 'heatmaps' .*crops\.strategy='five' cannot cut the "
                           r"\(9, 9\) heatmap.*multiple of 4 \(e\.g\. 16 or 20\)"):
    pipeline.run_pipeline(config, tmp_path / "run")
  assert not _contents(tmp_path / "run")


def test_a_stage_reading_a_pending_stage_is_not_traced(traced, tmp_path):
  """The LDM UNet trains on latents of the VAE stage: while that has not run, the
  pre-flight traces the VAE only."""
  pipeline.preflight(tiny_config("ldm"), tmp_path)
  assert traced == ["VAEStage"]


def test_candidate_sizes_are_nearest_first():
  assert base._candidate_sizes(36, 8)[:2] == [32, 40]  # pylint: disable=protected-access
  assert base._candidate_sizes(16, None)[:2] == [32, 64]  # pylint: disable=protected-access
