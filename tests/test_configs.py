"""Every config file: variant args are checked at load, every choice loads and resolves."""
import pytest

from medrep_jax import config_lib, methods
from medrep_jax.core import workdir as workdir_lib
from medrep_jax.train import pipeline

from conftest import REPO_ROOT, config_module, load_config

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))
# Variant args whose every value is a different config shape; `data` is checked by name only.
ENUMERATED = ("size", "variant", "stage", "task", "linear", "crop")


def _cases():
  for name in CONFIGS:
    choices = config_module(name).CHOICES
    for key in ENUMERATED:
      for value in choices.get(key, ()):
        yield pytest.param(name, f"{key}={value}", id=f"{name}:{key}={value}")


@pytest.mark.parametrize("name,arg", list(_cases()))
def test_every_choice_loads_locked_and_resolves_its_methods(name, arg):
  config = load_config(name, arg)
  assert config.is_locked
  runs = [config[s] for s in config.stages] if pipeline.is_pipeline(config) else [config]
  for run in runs:
    methods.load_method(run)


def test_every_config_file_declares_defaults_and_choices():
  for name in CONFIGS:
    module = config_module(name)
    assert set(module.CHOICES) <= set(module.DEFAULTS), name
    for key, allowed in module.CHOICES.items():
      assert module.DEFAULTS[key] in tuple(allowed), (name, key)


@pytest.mark.parametrize("name,arg,hint,allowed", [
    ("dcl_cstp", "size=smal", "Did you mean 'small'", "'paper', 'small', 'tiny'"),
    ("dcl_cstp", "variant=simclrr", "Did you mean 'simclr'", "'mocov2'"),
    ("camcontrast", "data=kermanny", "Did you mean 'kermany'", "'retinamnist'"),
    ("camcontrast", "crop=fiv", "Did you mean 'five'", "'five', 'four', 'none', 'random'"),
    ("camcontrast", "attention=Flase", "", "True, False"),
    ("finetune", "size=smal", "Did you mean 'small'", "'paper', 'small', 'tiny'"),
    ("finetune", "task=segmentaton", "Did you mean 'segmentation'", "'classification'"),
    ("finetune", "encoder=resnet5", "Did you mean", "'resnet50'"),
    ("ldm", "stage=vea", "Did you mean 'vae'", "'all', 'vae', 'unet', 'sample', 'filter'"),
    ("quickstart", "size=paper", "", "'small', 'tiny'"),
    ("pipeline_camcontrast", "linear=prob", "Did you mean 'probe'", "'probe', 'finetune'"),
    ("pipeline_camcontrast", "seg_data=kvasir", "Did you mean 'kvasir_seg'", "'auto'"),
    ("pipeline_dcl_cstp", "variant=simclrr", "Did you mean 'simclr'", "'dcl_cstp'"),
])
def test_bad_variant_value_fails_at_load_naming_the_arg_and_choices(name, arg, hint, allowed):
  key, value = arg.split("=")
  with pytest.raises(config_lib.ConfigError) as e:
    load_config(name, arg)
  message = str(e.value)
  assert f"{key}={value!r}" in message and f"Allowed {key} values" in message
  assert hint in message and allowed in message


def test_config_module_loads_siblings_once_and_reports_missing_files(tmp_path):
  assert config_module("finetune") is config_module("finetune")
  assert config_module("pipeline_dcl_cstp").dcl_cstp is config_module("dcl_cstp")
  with pytest.raises(config_lib.ConfigError, match="not found"):
    config_lib.config_module("finetune", tmp_path)


def test_pipeline_lists_its_stages_in_order():
  stages = {"b": load_config("finetune"), "a": load_config("finetune", "size=small")}
  config = config_lib.pipeline(stages)
  assert config.stages == ("b", "a") and config.a.train.num_steps == 300


def test_quickstart_compares_pretrained_with_random_init():
  """Each pretrained/random pair differs only in its initialization, and the downstream
  networks are the pretraining run's."""
  quick = load_config("quickstart", "size=small")
  assert quick.stages == ("pretrain", "probe", "probe_random", "segment", "segment_random")
  assert quick.pretrain.method == "dcl_cstp" and quick.pretrain.train.num_steps >= 100
  for a, b in quick.compare:
    diff = workdir_lib.config_diff(quick[b], quick[a])
    assert set(diff) == {"init_from", "init_from_rules"}, diff
    assert quick[a].init_from == "stage:pretrain"
    assert quick[a].model.encoder == quick.pretrain.model.encoder
    assert quick[a].data.image_size == quick.pretrain.data.image_size
    assert 0 < quick[a].label_fraction < 0.2
  assert quick.probe.freeze_encoder and not quick.segment.freeze_encoder


def test_frozen_classification_uses_the_linear_probe_protocol():
  frozen = load_config("finetune", "data=phantoms,freeze=True")
  assert frozen.model.head_norm and frozen.optim.name == "sgd" and frozen.optim.lr == 0.1
  assert frozen.optim.weight_decay == 0.0
  full = load_config("finetune", "size=tiny,data=phantoms")
  assert not full.model.head_norm and full.optim.name == "adamw"
  seg = load_config("finetune", "size=tiny,data=phantoms,freeze=True,task=segmentation")
  assert not seg.model.head_norm and seg.optim.name == "adamw"
