"""medrep_jax.export: the safetensors and msgpack files restore the run's arrays exactly,
model.json describes them, and the torch state dict loads strictly into the PyTorch
reference networks (benchmarks/torch_ref) and computes the flax outputs to 1e-4.

The torch tests skip without torch (CI installs [dev] only).
"""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from conftest import load_config
from medrep_jax import export, methods
from medrep_jax.core import runs
from medrep_jax.models import resnet, unet

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.xdist_group("export")  # one worker trains the two runs

TASKS = {"classification": "size=tiny,data=phantoms",
         "segmentation": "size=tiny,data=phantoms,task=segmentation"}


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
  """finetune_run(task): a tiny phantoms finetune run (2 steps), trained once per module."""
  done = {}

  def get(task: str) -> pathlib.Path:
    if task not in done:
      from medrep_jax.train import trainer
      config = load_config("finetune", TASKS[task])
      with config.unlocked():
        config.data.num_examples = 32
      done[task] = tmp_path_factory.mktemp(f"export_{task}")
      trainer.train_and_evaluate(config, done[task])
    return done[task]

  return get


@pytest.fixture
def torch():
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # OpenMP barriers crawl on a loaded 2-core box
  yield torch
  torch.set_num_threads(threads)


def _saved_arrays(workdir) -> dict[str, np.ndarray]:
  state = runs.load_run(workdir).state
  return export.flatten({"params": state["params"], **state["model_state"]})


def _images(n: int, size: int, channels: int = 1, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).random((n, size, size, channels), np.float32)


def _torch_outputs(torch, net, x: np.ndarray):
  with torch.no_grad():
    out = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
  if isinstance(out, dict):
    return {k: v.numpy() if v.ndim == 2 else v.permute(0, 2, 3, 1).numpy()
            for k, v in out.items()}
  return out.numpy() if out.ndim == 2 else out.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- safetensors, msgpack, model.json


def test_safetensors_restores_the_saved_arrays_exactly(finetune_run, tmp_path):
  from safetensors.numpy import load_file
  run = finetune_run("segmentation")
  desc = export.export(run, "safetensors", tmp_path)
  got, want = load_file(str(tmp_path / "variables.safetensors")), _saved_arrays(run)
  assert list(got) and set(got) == set(want)
  assert any(k.startswith("batch_stats/encoder/") for k in got)
  assert any(k.startswith("params/decoder/block0/") for k in got)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert export.flatten(export.unflatten(got)).keys() == got.keys()
  assert desc["weights_file"] == "variables.safetensors"


def test_msgpack_restores_the_saved_variables_exactly(finetune_run, tmp_path):
  run = finetune_run("classification")
  export.export(run, "msgpack", tmp_path)
  restored = serialization.msgpack_restore((tmp_path / "variables.msgpack").read_bytes())
  state = runs.load_run(run).state
  assert set(restored) == {"params", *state["model_state"]}
  got, want = export.flatten(restored), _saved_arrays(run)
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_model_json_describes_every_array_and_the_preprocessing(finetune_run, tmp_path):
  run = finetune_run("segmentation")
  export.export(run, "msgpack", tmp_path)
  desc = json.loads((tmp_path / "model.json").read_text())
  want = _saved_arrays(run)
  assert {a["path"]: (tuple(a["shape"]), a["dtype"]) for a in desc["arrays"]} == {
      k: (v.shape, v.dtype.name) for k, v in want.items()}
  assert desc["num_parameters"] == sum(v.size for k, v in want.items()
                                       if k.startswith("params/"))
  assert desc["run"]["method"] == "finetune" and desc["run"]["step"] == 2
  arch = desc["architecture"]
  assert arch["class"] == "medrep_jax.models.unet.UNet"
  assert arch["fields"]["num_classes"] == desc["outputs"]["shape"][-1] == 3
  assert arch["fields"]["decoder_widths"] == [32, 16, 16, 8, 8]
  enc = arch["fields"]["encoder"]
  assert enc["class"] == "medrep_jax.models.resnet.ResNet"
  assert enc["fields"]["stage_sizes"] == [1, 1, 1, 1] and enc["fields"]["small_input"] is True
  assert enc["fields"]["dtype"] == "float32"
  assert desc["config_model"]["encoder"] == "resnet_tiny"
  assert desc["input"]["image_size"] == [32, 32] and desc["input"]["channels"] == 1
  assert desc["classes"]["num_mask_classes"] == 3
  pre = desc["preprocessing"]
  assert [t["op"] for t in pre["transforms"]] == ["Resize", "ToChannels", "Normalize",
                                                  "CheckShapes"]
  assert pre["transforms"][0]["size"] == 32 and pre["normalize"] == "unit"
  assert "[0, 1]" in pre["summary"]


def test_submodule_exports_the_encoder_alone(finetune_run, tmp_path):
  run = finetune_run("classification")
  desc = export.export(run, "safetensors", tmp_path, submodule="encoder")
  assert desc["architecture"]["class"] == "medrep_jax.models.resnet.ResNet"
  want = export.flatten(runs.load_run(run).variables("encoder"))
  assert {a["path"] for a in desc["arrays"]} == set(want)
  assert "params/stem_conv/kernel" in want
  with pytest.raises(export.ExportError, match="no such submodule"):
    export.export(run, "safetensors", tmp_path, submodule="decoder")


def test_bad_format_and_options_are_clear_errors(finetune_run, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("MEDREP_DEBUG", raising=False)
  run = finetune_run("classification")
  with pytest.raises(export.ExportError, match="onnx.*safetensors, msgpack, torch"):
    export.export(run, "onnx", tmp_path / "a")
  with pytest.raises(export.ExportError, match="include_extras"):
    export.export(run, "torch", tmp_path / "a", include_extras=True)
  assert not (tmp_path / "a").exists()
  code = export.main(["--workdir", str(run), "--format", "onnx", "--output", str(tmp_path)])
  err = capsys.readouterr().err
  assert code == 2 and "unknown export format 'onnx'" in err and "Traceback" not in err
  code = export.main(["--workdir", str(tmp_path / "nope"), "--format", "msgpack",
                      "--output", str(tmp_path)])
  assert code == 2 and "not a medrep_jax run directory" in capsys.readouterr().err


def test_cli_writes_the_files(finetune_run, tmp_path, capsys):
  run = finetune_run("classification")
  out = tmp_path / "out"
  assert export.main(["--workdir", str(run), "--format", "msgpack", "--output", str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["model.json", "variables.msgpack"]
  assert "variables.msgpack" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["cstp", "vae"])
def test_torch_export_of_a_model_without_reference_is_a_clear_error(
    finetune_run, tmp_path, monkeypatch, kind):
  from medrep_jax.methods.dcl_cstp import ContrastiveNet
  from medrep_jax.models import heads, vae
  trained = methods.load_trained(finetune_run("classification"))
  if kind == "cstp":
    model = ContrastiveNet(encoder=resnet.resnet_tiny(small_input=True),
                           projector=heads.make_projector("cstp", embed_dim=16, out_dim=8,
                                                          num_heads=2))
  else:
    model = vae.AutoencoderKL(in_channels=1)
  trained.stage.__dict__["model"] = model  # the stage's cached model
  monkeypatch.setattr(export.methods, "load_trained", lambda path: trained)
  with pytest.raises(export.ExportError) as err:
    export.export(trained.run.path, "torch", tmp_path)
  message = str(err.value)
  assert type(model).__name__ in message and "Supported: unet.Classifier" in message
  assert "safetensors or msgpack" in message
  assert ("--submodule encoder" in message.split("Export it")[-1]) == (kind == "cstp")


# ---------------------------------------------------------------- torch


@pytest.mark.parametrize("task", list(TASKS))
def test_torch_export_loads_strictly_and_matches_flax(finetune_run, tmp_path, torch, task):
  from benchmarks.torch_ref import unet as torch_unet
  run = finetune_run(task)
  desc = export.export(run, "torch", tmp_path)
  net = torch_unet.build(json.loads((tmp_path / "model.json").read_text()))
  state = torch.load(tmp_path / "state_dict.pt", weights_only=True)
  net.load_state_dict(state, strict=True)
  assert {a["torch_name"] for a in desc["arrays"]} | set(desc["torch"]["other_tensors"]) \
      == set(state)
  trained = methods.load_trained(run)
  x = _images(3, 32)
  want = np.asarray(trained.model.apply(trained.variables, jnp.asarray(x), train=False))
  got = _torch_outputs(torch, net, x)
  assert got.shape == want.shape == ((3, 3) if task == "classification" else (3, 32, 32, 3))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_torch_export_of_the_encoder_alone(finetune_run, tmp_path, torch):
  from benchmarks.torch_ref import unet as torch_unet
  run = finetune_run("classification")
  export.export(run, "torch", tmp_path, submodule="encoder")
  net = torch_unet.build(json.loads((tmp_path / "model.json").read_text()))
  net.load_state_dict(torch.load(tmp_path / "state_dict.pt", weights_only=True), strict=True)
  trained = methods.load_trained(run)
  x = _images(2, 32, seed=1)
  want = trained.model.encoder.apply(runs.load_run(run).variables("encoder"), jnp.asarray(x),
                                     train=False)
  with torch.no_grad():
    got = torch_unet.encoder_features(net.eval(), torch.from_numpy(x).permute(0, 3, 1, 2))
  assert set(got) == set(want)
  np.testing.assert_allclose(got["pooled"].numpy(), want["pooled"], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got["c5"].permute(0, 2, 3, 1).numpy(), want["c5"], atol=1e-4,
                             rtol=1e-4)


def _random_variables(model, x) -> dict:
  """Random values for every leaf (zero-initialized layers matter too); positive variances."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(0)

  def draw(path, s):
    if getattr(path[-1], "key", None) == "var":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.3 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("encoder, norm, upsample, size", [
    ("resnet_tiny", "batch", "transpose", 37),  # ImageNet stem: final step, odd sizes
    ("resnet_tiny", "group", "bilinear", 40),
    ("unet_encoder", "none", "transpose", 24),
    ("unet_encoder", "group", "bilinear", 20),
])
def test_torch_unet_computes_the_flax_unet(torch, encoder, norm, upsample, size):
  from benchmarks.torch_ref import unet as torch_unet
  kw = dict(widths=(8, 16, 16)) if encoder == "unet_encoder" else {}
  enc = unet.get_encoder(encoder, norm=norm, **kw)
  model = unet.UNet(num_classes=2, encoder=enc, decoder_widths=(16, 16, 8, 8, 8), norm=norm,
                    upsample=upsample)
  x = _images(2, size, channels=3, seed=2)
  variables = _random_variables(model, x)
  state, _ = export.torch_state_dict(
      variables, conv_transpose=export.conv_transpose_paths(model, variables["params"]))
  net = torch_unet.build({"architecture": export.describe_module(model),
                          "input": {"channels": 3}})
  net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                      strict=True)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  # norm="none" lets activations reach ~10 through 8 layers: float32 sums in another
  # order differ by ~5e-4 relative there, so rtol is 2e-3.
  np.testing.assert_allclose(_torch_outputs(torch, net, x), want, atol=1e-4, rtol=2e-3)


@pytest.mark.parametrize("head_norm", [False, True])
def test_torch_classifier_computes_the_flax_classifier(torch, head_norm):
  from benchmarks.torch_ref import unet as torch_unet
  kw = {"head_norm": True} if head_norm else {}
  if head_norm and "head_norm" not in unet.Classifier.__dataclass_fields__:
    pytest.skip("unet.Classifier has no head_norm")
  model = unet.Classifier(num_classes=4, encoder=resnet.resnet_tiny(), **kw)
  x = _images(2, 40, channels=3, seed=4)
  variables = _random_variables(model, x)
  state, _ = export.torch_state_dict(variables)
  net = torch_unet.build({"architecture": export.describe_module(model),
                          "input": {"channels": 3}})
  net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                      strict=True)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  np.testing.assert_allclose(_torch_outputs(torch, net, x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("src, dst", [((8, 8), (16, 16)), ((5, 7), (11, 13)),
                                      ((34, 34), (33, 33)), ((20, 9), (7, 4))])
def test_torch_resize_matches_jax_image_resize(torch, src, dst):
  from benchmarks.torch_ref import unet as torch_unet
  x = np.random.default_rng(3).standard_normal((2, *src, 3)).astype(np.float32)
  want = np.asarray(jax.image.resize(x, (2, *dst, 3), "bilinear"))
  got = torch_unet.resize(torch.from_numpy(x).permute(0, 3, 1, 2), dst)
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)
