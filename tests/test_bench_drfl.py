"""The DRFL benchmark: the PyTorch reference computes the JAX network and loss, the suite runs.

Same weights -> same outputs (eval mode: no dropout, BatchNorm running statistics), same
eq. 7 terms, same gradients (train mode with dropout off: BatchNorm batch statistics),
and ``python -m benchmarks.run --quick --only drfl`` gives a timed row with a JAX/PyTorch
ratio. No timing asserts (DESIGN.md). Torch-dependent tests skip without the ``[bench]``
extra.
"""
import copy
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks.workloads.drfl import binary_masks  # noqa: E402
from conftest import config_module  # noqa: E402
from medrep_jax.losses import drfl as drfl_losses  # noqa: E402
from medrep_jax.methods import load_method  # noqa: E402
from medrep_jax.methods.drfl_parts import common  # noqa: E402
from medrep_jax.models import drfl as drfl_model  # noqa: E402

SIZE, BATCH = 32, 2  # configs/drfl.py size=tiny


def _config(**model):
  c = config_module("drfl").drfl_config(variant="drfl", size="tiny", recipe="paper")
  c.model.update(model)
  return c


def _flax_model(config) -> drfl_model.DRFL:
  """The flax DRFL the `drfl` method builds for ``config`` (binary masks: K = 1)."""
  method = load_method(config)
  binary_masks(method)
  return method.model


def _random_variables(model):
  """Every leaf random (no compiled init): BatchNorm variances positive, so each layer
  and statistic matters."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, SIZE, SIZE, 1)), train=False))
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = getattr(path[-1], "key", "")
    if name == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if name == "scale":
      return (1 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
    if name in ("bias", "mean"):
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
    return (rng.standard_normal(s.shape) / math.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _batch():
  rng = np.random.default_rng(1)
  image = rng.random((BATCH, SIZE, SIZE, 1), np.float32)
  mask = (rng.random((BATCH, SIZE, SIZE)) > 0.5).astype(np.uint8)
  return image, mask


def _nchw(torch, x):
  return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def jax_eval():
  """(config, variables, image, mask, JAX train=False outputs) at size tiny."""
  c = _config()
  model = _flax_model(c)
  variables = _random_variables(model)
  image, mask = _batch()
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, image)
  return c, variables, image, mask, jax.device_get(outputs)


def _torch_eval(torch, c, variables, image):
  from benchmarks.torch_ref import drfl as ref
  net = ref.drfl_from_config(c)
  ref.load_flax(net, variables["params"], variables["batch_stats"])
  with torch.no_grad():
    return net, net.eval()(_nchw(torch, image))


def test_torch_drfl_has_the_jax_parameter_count(torch, jax_eval):
  del torch
  from benchmarks.torch_ref import drfl as ref
  c, variables = jax_eval[:2]
  n_jax = sum(a.size for a in jax.tree.leaves(variables["params"]))
  assert ref.count_params(ref.drfl_from_config(c)) == n_jax  # Same layers: exactly equal.


def test_torch_drfl_forward_matches_jax(torch, jax_eval):
  """p_bin, p_sr, p_fusion of the eval-mode torch net on copied weights (Fig. 2)."""
  c, variables, image, _, want = jax_eval
  _, got = _torch_eval(torch, c, variables, image)
  assert set(got) == set(want) == {"p_bin", "p_sr", "p_fusion"}
  for k, w in want.items():
    g = got[k].permute(0, 2, 3, 1).numpy()
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=k)


def test_torch_drfl_losses_match_jax(torch, jax_eval):
  """Eq. 7 and its terms (eq. 1-6), with the SR target made on each side (bicubic 2x)."""
  from benchmarks.torch_ref import drfl as ref
  c, variables, image, mask, outputs = jax_eval
  target = common.bicubic_2x(jnp.asarray(image))
  t_target = ref.bicubic_2x(_nchw(torch, image))
  np.testing.assert_allclose(t_target.permute(0, 2, 3, 1).numpy(), target, atol=1e-6)
  want, want_terms = drfl_losses.drfl_loss(outputs, jnp.asarray(mask), target)
  _, got_out = _torch_eval(torch, c, variables, image)
  got, got_terms = ref.drfl_loss(got_out, torch.from_numpy(mask), t_target)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  assert set(got_terms) == set(want_terms) == {"loss_seg", "loss_sr", "loss_fusion"}
  for k, w in want_terms.items():
    assert float(got_terms[k]) == pytest.approx(float(w), rel=1e-5, abs=1e-6), k


def test_torch_drfl_train_mode_gradients_match_jax(torch):
  """Train mode with dropout off (BatchNorm on batch statistics): the same eq. 7 loss and
  the same gradient of every parameter (JAX's gradients loaded into a torch net by name)."""
  from benchmarks.torch_ref import drfl as ref
  c = _config(dropout=0.0, transformer_dropout=0.0)
  model = _flax_model(c)
  variables = _random_variables(model)
  image, mask = _batch()
  target = common.bicubic_2x(jnp.asarray(image))

  def loss_fn(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, image,
                         train=True, mutable=["batch_stats"])
    return drfl_losses.drfl_loss(out, jnp.asarray(mask), target)[0]

  want, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  net = ref.drfl_from_config(c)
  ref.load_flax(net, variables["params"], variables["batch_stats"])
  step = ref.DRFLTrainStep(net, c)
  loss, _, _ = step.losses(_nchw(torch, image), torch.from_numpy(mask))
  loss.backward()
  assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
  as_torch = copy.deepcopy(net)
  ref.load_flax(as_torch, jax.device_get(grads))
  want_grads = dict(as_torch.named_parameters())
  for name, p in net.named_parameters():
    np.testing.assert_allclose(p.grad.numpy(), want_grads[name].detach().numpy(),
                               atol=2e-5, rtol=1e-3, err_msg=name)


def test_torch_drfl_step_trains_and_augments_pairs(torch):
  from benchmarks.torch_ref import drfl as ref
  torch.manual_seed(0)
  image = torch.rand(4, 1, SIZE, SIZE)
  mask = (image[:, 0] > 0.5).to(torch.uint8)
  aug_image, aug_mask = ref.flip_rotate(image, mask)
  assert torch.equal(aug_mask, (aug_image[:, 0] > 0.5).to(torch.uint8))  # Same map per pair.
  c = _config()
  c.augment = False
  step = ref.DRFLTrainStep(ref.drfl_from_config(c), c)
  losses = [float(step(image, mask)) for _ in range(8)]
  assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.slow  # compiles the whole DRFL train step (about 35 s of XLA at -O0)
def test_suite_runs_drfl_quick_with_torch(tmp_path):
  """``python -m benchmarks.run --quick --only drfl``: a timed row and its torch ratio."""
  pytest.importorskip("torch")
  out = tmp_path / "suite.json"
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # One device, as a user run.
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "drfl",
                         "--torch-threads", "1", "--json", str(out)], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "speedup_vs_torch" in proc.stdout
  (row,) = json.loads(out.read_text())["rows"]
  assert row["workload"] == "drfl" and row["point"] == "DRFL tiny 32px B4 float32"
  assert row["step_s"] > 0 and row["examples_per_sec"] > 0 and row["compiles"] == 1
  assert row["undonated"] == [] and row["donation_warnings"] == []
  assert 0.5 < row["xla_over_analytic"] < 2.0
  sp = row["speedup_vs_torch_eager"]
  assert sp["min"] <= sp["median"] <= sp["max"] and len(sp["ratios"]) == 2
  assert row["speedup_vs_torch"] == sp and row["speedup_vs_torch_compile"] is None
  assert row["torch"]["eager"]["threads"] == 1 and row["torch"]["eager"]["step_s"] > 0
