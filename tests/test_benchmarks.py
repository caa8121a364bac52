"""Fast checks of the benchmark code: harness helpers, torch reference, end-to-end run.

No timing asserts (DESIGN.md): speed is reported by the benchmarks themselves.
Torch-dependent tests skip without the ``[bench]`` extra.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from medrep_jax.models.diffusion_unet import (diffusion_unet_config,  # noqa: E402
                                              get_diffusion_unet)

EXPECTED_KEYS = {"benchmark", "timestamp", "config", "device", "params", "jax_train",
                 "sampling", "speedup_vs_torch", "sampler_compilations",
                 "sampler_overhead"}


# ------------------------------------------------------------------ harness


def test_time_fn_returns_positive_quantiles():
  calls = []
  out = harness.time_fn(lambda: calls.append(1) or jnp.ones(3) * 2, warmup=2, iters=5)
  assert len(calls) == 7
  assert len(out["times"]) == 5
  assert 0 < out["p10_s"] <= out["median_s"] <= out["p90_s"]


def test_time_fn_rejects_zero_iters():
  with pytest.raises(ValueError, match="iters"):
    harness.time_fn(lambda: None, iters=0)


def test_compile_and_cost_flops_of_matmul():
  m, k, n = 64, 32, 48
  f = jax.jit(lambda a, b: a @ b)
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  res = harness.compile_time(f, a, b)
  assert res.lower_s >= 0 and res.compile_s > 0
  assert res.total_s == pytest.approx(res.lower_s + res.compile_s)
  np.testing.assert_allclose(res.compiled(a, b), np.full((m, n), k))
  assert harness.cost_flops(res.compiled) == pytest.approx(2 * m * n * k, rel=0.05)
  mem = harness.memory_bytes(res.compiled)
  if mem is not None:  # Backends without memory_analysis return None.
    assert mem["argument_size_in_bytes"] == 4 * (m * k + k * n)
    assert mem["output_size_in_bytes"] == 4 * m * n


class _FakeCompiled:

  def __init__(self, cost):
    self._cost = cost

  def cost_analysis(self):
    if isinstance(self._cost, Exception):
      raise self._cost
    return self._cost

  def memory_analysis(self):
    raise NotImplementedError


@pytest.mark.parametrize("cost, expected", [
    ({"flops": 10.0}, 10.0),
    ([{"flops": 10.0}, {"flops": 5.0}], 15.0),  # Older JAX: one dict per module.
    ([{"flops": 3.0}, {"bytes accessed": 1.0}], 3.0),
    ({"bytes accessed": 1.0}, None),
    (None, None),
    ([], None),
    (NotImplementedError("no cost model"), None),
])
def test_cost_flops_handles_return_shapes(cost, expected):
  assert harness.cost_flops(_FakeCompiled(cost)) == expected
  assert harness.memory_bytes(_FakeCompiled(cost)) is None


def test_interleave_alternates_order():
  order = []
  med = harness.interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                           rounds=3, iters={"a": 1, "b": 2}, warmup=0)
  assert order == ["a", "b", "b", "b", "b", "a", "a", "b", "b"]
  assert [len(v) for v in med.values()] == [3, 3]


def test_ab_compare_ratio_is_torch_over_jax():
  out = harness.ab_compare(lambda: time.sleep(0.001), lambda: time.sleep(0.02),
                           rounds=3, iters=1, warmup=0)
  assert len(out["ratios"]) == 3
  assert out["min"] <= out["median"] <= out["max"]
  for r, j, t in zip(out["ratios"], out["jax"]["times"], out["torch"]["times"]):
    assert r == pytest.approx(t / j)


def test_device_info_json_and_table(tmp_path):
  info = harness.device_info()
  assert info["platform"] == jax.devices()[0].platform
  assert info["device_count"] == len(jax.devices())
  assert info["jax_version"] == jax.__version__
  assert isinstance(info["cpu_model"], str) and info["cpu_model"]
  record = {"device": info, "x": np.float32(1.5), "n": np.int64(3), "a": np.arange(2)}
  path = harness.write_json(record, tmp_path / "sub" / "r.json")
  back = json.loads(path.read_text())
  assert back["x"] == 1.5 and back["n"] == 3 and back["a"] == [0, 1]
  text = harness.print_table([{"k": 1.23456, "v": None}, {"k": "x"}], ["k", ("v", "V")])
  lines = text.splitlines()
  assert lines[0].split() == ["k", "V"]
  assert lines[2].split() == ["1.235", "-"]
  assert lines[3].split() == ["x", "-"]


# ------------------------------------------------------------------ torch reference


def test_torch_reference_matches_jax_size_and_shape(torch):
  from benchmarks.torch_ref import diffusion_unet as ref
  model = get_diffusion_unet("tiny", 3)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1,), jnp.int32))
  n_jax = sum(p.size for p in jax.tree.leaves(params))
  model = ref.unet_from_config(diffusion_unet_config("tiny"), 3, 3)
  assert ref.count_params(model) == n_jax  # Same layers, so exactly equal.
  out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
  assert out.shape == (2, 3, 16, 16)


def test_torch_reference_computes_the_jax_function(torch):
  from benchmarks.torch_ref import diffusion_unet as ref
  model = get_diffusion_unet("tiny", 3)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([3, 700], jnp.int32)
  # Random values for every leaf (no init compile), so zero-initialized layers matter.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
  want = np.asarray(jax.jit(model.apply)(params, x, t))
  tmodel = ref.unet_from_config(diffusion_unet_config("tiny"), 3, 3)
  ref.load_flax_params(tmodel, params["params"])
  with torch.no_grad():
    got = tmodel(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                 torch.from_numpy(np.array(t)))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-4, rtol=1e-4)


def test_torch_train_step_reduces_loss_on_fixed_batch(torch):
  from benchmarks.torch_ref import diffusion_unet as ref
  torch.manual_seed(0)
  model = ref.unet_from_config(diffusion_unet_config("tiny"), 3, 3)
  step = ref.DDPMTrainStep(model, lr=1e-3)
  x0 = torch.randn(4, 3, 16, 16)
  t = torch.tensor([10, 200, 500, 900])
  noise = torch.randn_like(x0)
  losses = [float(step(x0, t, noise)) for _ in range(15)]
  assert losses[0] == pytest.approx(float(noise.pow(2).mean()), rel=1e-5)  # Zero-init out.
  assert losses[-1] < 0.8 * losses[0]


def test_torch_reference_rejects_unsupported_conditioning(torch):
  del torch
  from benchmarks.torch_ref import diffusion_unet as ref
  with pytest.raises(ValueError, match="num_classes"):
    ref.unet_from_config(diffusion_unet_config("tiny", num_classes=3), 3, 3)


# ------------------------------------------------------------------ end to end

_FAST = ["--size", "tiny", "--batch", "4", "--steps", "3", "--ddim", "5",
         "--warmup", "1", "--sample-rounds", "1", "--forward-iters", "2"]


def _run_benchmark(tmp_path, argv: list[str]) -> dict:
  """Runs ``python *argv`` in the repo root; $BENCH_JSON is the output path."""
  out = tmp_path / "bench.json"
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BENCH_JSON": str(out)}
  argv = [a.replace("$BENCH_JSON", str(out)) for a in argv]
  proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sampler_compilations" in proc.stdout  # The printed table.
  record = json.loads(out.read_text())
  assert EXPECTED_KEYS <= set(record)
  assert record["config"]["shape"] == [4, 16, 16, 3]
  assert record["config"]["size"] == "tiny"
  assert record["sampler_compilations"] == 1
  assert record["sampling"]["jit_cache_size"] in (1, None)
  assert record["jax_train"]["median_s"] > 0
  assert record["jax_train"]["flops_per_example"] > 0
  assert record["sampling"]["images_per_sec"] > 0
  return record


def test_benchmark_runs_without_torch(tmp_path):
  # torch is made unimportable, as in CI's [dev]-only environment.
  code = ("import os, runpy, sys; sys.modules['torch'] = None; "
          "sys.argv = ['benchmarks.diffusion', *%r, '--no-torch', "
          "'--json', os.environ['BENCH_JSON']]; "
          "runpy.run_module('benchmarks.diffusion', run_name='__main__')" % (_FAST,))
  record = _run_benchmark(tmp_path, ["-c", code])
  assert record["speedup_vs_torch"] is None
  assert "torch_train" not in record


def test_benchmark_runs_with_torch(tmp_path):
  pytest.importorskip("torch")
  record = _run_benchmark(tmp_path, ["-m", "benchmarks.diffusion", *_FAST,
                                     "--torch-threads", "1", "--json", "$BENCH_JSON"])
  assert record["params"]["torch"] == record["params"]["jax"]
  speedup = record["speedup_vs_torch"]
  assert len(speedup["ratios"]) == 3
  assert speedup["min"] <= speedup["median"] <= speedup["max"]
  assert record["torch_train"]["eager"]["threads"] == 1


# ------------------------------------------------------------------ model FLOPs, HLO dtypes


def test_count_flops_resnet50_matches_the_published_count():
  from benchmarks import flops
  from medrep_jax.models import resnet
  model = resnet.resnet50()
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                train=False))
  fwd = flops.count_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert fwd == pytest.approx(8.2e9, rel=0.01)  # 4.1 GMAC (He et al., 2016).
  assert flops.train_step_flops(fwd, 2 * fwd) == pytest.approx(5 * fwd)


def test_count_flops_counts_matmuls_and_scan_bodies():
  from benchmarks import flops
  a, b = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4), jnp.float32)
  assert flops.count_flops(lambda a, b: a @ b, a, b) == 2 * 8 * 16 * 4

  def scanned(a, b):
    return jax.lax.scan(lambda c, _: (c, jnp.tanh(c @ b)), a, None, length=5)[1]

  assert flops.count_flops(scanned, a, b) == 5 * 2 * 8 * 16 * 4


def test_count_flops_of_a_transposed_conv_skips_the_inserted_zeros():
  from benchmarks import flops
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 5), jnp.float32)
  up = lambda x, w: jax.lax.conv_transpose(x, w, (2, 2), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Each input pixel meets the 3x3 kernel once: 2 x 2*8*8 pixels x 9 taps x 4 x 5.
  assert flops.count_flops(up, x, w) == 2 * (2 * 8 * 8) * 9 * 4 * 5


def test_matmul_dtypes_reads_lowered_and_compiled_hlo():
  from benchmarks import guards

  def f(x, w, a, b):
    y = jax.lax.conv_general_dilated(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1),
                                     "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.astype(jnp.float32).sum() + (a @ b).sum()

  args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5)), jnp.ones((6, 7)), jnp.ones((7, 9)))
  lowered = jax.jit(f).lower(*args)
  report = guards.matmul_dtypes(lowered.as_text())
  conv, dot = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4), 2 * 6 * 9 * 7
  assert report["convolution"] == {"bf16": conv}
  assert report["dot_general"] == {"f32": dot}
  assert report["bf16_fraction"] == pytest.approx(conv / (conv + dot))
  assert report["f32_ops"] == [("dot_general", [6, 7], [7, 9])]
  compiled = guards.compiled_matmul_dtypes(lowered.compile().as_text())
  assert sum(compiled.values()) == 2 and "dot:f32*f32" in compiled


# ------------------------------------------------------------------ torch dual-stream step


def test_torch_resnet50_has_the_jax_parameter_count(torch):
  del torch
  from benchmarks.torch_ref.diffusion_unet import count_params
  from benchmarks.torch_ref.resnet import ResNet
  assert count_params(ResNet("resnet50", 3)) == 23_508_032  # As medrep_jax.models.resnet.


def test_torch_dual_stream_step_computes_the_jax_step(torch):
  """Same weights, bank and views: same loss terms, same enqueued keys, same SGD update."""
  from benchmarks.torch_ref import dual_stream
  from medrep_jax.data import augment
  from medrep_jax.methods import load_method
  from conftest import config_module
  from medrep_jax.core import mesh as mesh_lib
  c = config_module("dcl_cstp").dcl_cstp_config(size="tiny", data="phantoms")
  method = load_method(c)
  method.mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  batch = {"image": jnp.asarray(np.random.default_rng(0).random((8, 32, 32, 1), np.float32)),
           "index": jnp.arange(8)}
  state = jax.jit(method.init_state)(jax.random.key(0), batch)
  rng = jax.random.key(5)
  new_state, metrics = jax.jit(method.train_step)(state, batch, rng)
  views = augment.make_views(rng, batch["image"], c.augment.policy, method.num_views,
                             indices=batch["index"], out_size=int(c.data.image_size),
                             **method.augment_kwargs)
  step = dual_stream.DualStreamStep(dual_stream.net_from_config(c), c)
  step.load_jax_state(state)
  x = torch.from_numpy(np.array(views)).permute(0, 1, 4, 2, 3).contiguous()
  with torch.no_grad():
    loss, terms, _ = step.losses(x)
  assert float(loss) == pytest.approx(float(metrics["loss"]), rel=1e-4)
  for k in ("nce", "kl", "cs"):
    assert float(terms[k]) == pytest.approx(float(metrics[f"loss/{k}"]), rel=1e-4, abs=1e-6)
  step(x)
  np.testing.assert_allclose(step.bank.numpy(), np.asarray(new_state.extras["bank"]), atol=1e-5)
  for module, path in ((step.net.projector.head, ("projector", "head")),
                       (step.net.encoder.stem_conv, ("encoder", "stem_conv"))):
    want = np.asarray(new_state.params[path[0]][path[1]]["kernel"])
    got = module.weight.detach().numpy()
    got = got.T if got.ndim == 2 else got.transpose(2, 3, 1, 0)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------ the suite


def _run_suite(tmp_path, args: list[str], *, hide_torch: bool = False) -> tuple[dict, str]:
  out = tmp_path / "suite.json"
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # One device, as a user run.
  argv = ["benchmarks.run", "--quick", *args, "--json", str(out)]
  hide = "sys.modules['torch'] = None; " if hide_torch else ""  # As a [dev]-only install.
  code = (f"import runpy, sys; {hide}sys.argv = {argv!r}; "
          f"runpy.run_module('benchmarks.run', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_suite_runs_and_checks_with_torch(tmp_path):
  pytest.importorskip("torch")
  record, stdout = _run_suite(tmp_path, ["--only", "dcl_cstp,ldm_unet", "--check",
                                         "--torch-threads", "1"])
  assert "speedup_vs_torch_eager" in stdout and "step traced once" in stdout
  rows = {r["workload"]: r for r in record["rows"]}
  assert set(rows) == {"dcl_cstp", "ldm_unet"}
  for r in rows.values():
    assert r["step_s"] > 0 and r["examples_per_sec"] > 0 and r["compiles"] == 1
    assert r["undonated"] == [] and r["donation_warnings"] == []
    assert 0.5 < r["xla_over_analytic"] < 2.0  # XLA's count vs 3 x forward (+ momentum).
    sp = r["speedup_vs_torch_eager"]
    assert sp["min"] <= sp["median"] <= sp["max"] and len(sp["ratios"]) == 2
    assert r["speedup_vs_torch"] is not None and r["torch_setup"] == "eager"
    # --quick leaves torch.compile out (minutes per reference on a CPU) and says so.
    assert r["speedup_vs_torch_compile"] is None and "--quick" in r["torch_notes"][0]
  assert rows["dcl_cstp"]["torch"]["eager"]["threads"] == 1
  assert 0 < rows["dcl_cstp"]["augment_s"]
  assert record["checks"] and all(c["ok"] is not False for c in record["checks"])


def test_suite_runs_without_torch(tmp_path):
  record, _ = _run_suite(tmp_path, ["--only", "ddim50,vae"], hide_torch=True)
  rows = {r["workload"]: r for r in record["rows"]}
  assert set(rows) == {"ddim50", "vae"}
  assert rows["ddim50"]["ddim_steps"] == 50 and rows["ddim50"]["jit_cache_size"] == 1
  assert all("speedup_vs_torch" not in r for r in rows.values())
  assert record["peak"]["flops_per_sec"] > 0


def test_profile_classifies_ops_by_kind_and_pass():
  from benchmarks import guards
  from benchmarks.profile_step import classify
  text = "\n".join([
      "%fused_computation.1 (param_0: f32[8,6,6,4], param_1: f32[6,6,4,5]) -> f32[3,3,4,5] {",
      "  %param_0 = f32[8,6,6,4]{3,2,1,0} parameter(0)",
      "  %param_1 = f32[6,6,4,5]{3,2,1,0} parameter(1)",
      "  ROOT %convolution.1 = f32[3,3,4,5]{3,2,1,0} convolution(%param_0, %param_1), "
      "window={size=6x6 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf",
      "}",
      "ENTRY %main (p0: f32[8,6,6,4], p1: f32[3,3,4,5], p2: f32[8,6,6,5]) -> f32[8,6,6,5] {",
      "  %p0 = f32[8,6,6,4]{3,2,1,0} parameter(0)",
      "  %p1 = f32[3,3,4,5]{3,2,1,0} parameter(1)",
      "  %p2 = f32[8,6,6,5]{3,2,1,0} parameter(2)",
      "  %ynn_fusion.1 = f32[3,3,4,5]{3,2,1,0} fusion(%p0, %p2), kind=kCustom, "
      "calls=%fused_computation.1",
      "  %conv.2 = f32[8,6,6,5]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, "
      "dim_labels=b01f_01io->b01f, metadata={op_name=\"jit(step)/jvp(Net)/encoder/conv\"}",
      "  ROOT %add.3 = f32[8,6,6,5]{3,2,1,0} add(%conv.2, %p2), "
      "metadata={op_name=\"jit(step)/transpose(jvp(Net))/add\"}",
      "}"])
  instrs, comps = guards.parse_hlo(text)
  assert classify("ynn_fusion.1", instrs, comps) == ("conv", "backward: filter grad")
  assert classify("conv.2", instrs, comps) == ("conv", "forward (online, 3 views)")
  assert classify("add.3", instrs, comps) == ("elementwise/other", "backward")
  assert guards.compiled_matmul_dtypes(text) == {"convolution:f32*f32": 2}
