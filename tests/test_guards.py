"""Regression guards for the compiled train steps (issue 6), on tiny configs.

* the train step is traced once in the real training loop, and no step call
  makes an implicit host transfer (``jax.transfer_guard("disallow")``);
* params, optimizer state and method extras (memory bank, momentum encoder,
  EMA) are donated, with no "donated buffers were not usable" warning;
* in bf16 mode the convolutions and (FLOP-weighted) matmuls of the lowered
  step have bf16 operands.
Speed (e.g. a flat step time as the bank grows 16x) is a benchmark, not a
test: ``python -m benchmarks.run --check``. Each guard also has a negative
control, so a guard that cannot fail is caught here.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks import guards, steps  # noqa: E402
from benchmarks.workloads import ldm, segmentation, ssl  # noqa: E402
from benchmarks.workloads.common import Options  # noqa: E402
from medrep_jax.methods import load_method  # noqa: E402
from medrep_jax.train import trainer as trainer_lib  # noqa: E402
from conftest import config_module  # noqa: E402

def _ssl(dtype="float32"):
  opts = Options(suite="quick", dtype=dtype)
  c = ssl.ssl_config("dcl_cstp", opts, **opts.size(ssl.MAIN))
  return c, ssl.ssl_batch(c, 0), None


def _unet(dtype="float32"):
  return ldm.unet_setup(Options(suite="quick", dtype=dtype))


def _seg(dtype="float32"):
  return (*segmentation.seg_setup(Options(suite="quick", dtype=dtype)),
          segmentation.binary_masks)


WORKLOADS = {"dcl_cstp": _ssl, "ldm_unet": _unet, "seg_finetune": _seg}


@pytest.fixture(scope="module")
def f32_bench():
  """f32_bench(name): the float32 quick-size StepBench of a workload, built once."""
  built = {}

  def get(name):
    if name not in built:
      c, batch, prepare = WORKLOADS[name]()
      method = load_method(c)
      if prepare is not None:
        prepare(method)
      built[name] = steps.StepBench(c, batch, method=method)
    return built[name]

  yield get
  for bench in built.values():
    bench.close()


# ------------------------------------------------------------------ the real loop


class _GuardedTrainer(trainer_lib.Trainer):
  """The trainer, with every step call under jax.transfer_guard("disallow")."""

  def _compile_step(self):
    self.jitted_step = super()._compile_step()

    def guarded(state, batch):
      with jax.transfer_guard("disallow"):
        return self.jitted_step(state, batch)

    return guarded


def test_training_loop_traces_the_step_once_without_host_transfers(tmp_path):
  c = config_module("dcl_cstp").dcl_cstp_config(size="tiny", data="phantoms")
  c.data.num_examples = 32
  c.train.update(num_steps=4, log_every=2, checkpoint_every=0, progress=False)
  method = load_method(c)
  counter = guards.count_traces(method)
  trainer = _GuardedTrainer(c, tmp_path, method)
  result = trainer.run()
  assert result["step"] == 4
  assert counter["traces"] == 1
  assert steps.jit_cache_size(trainer.jitted_step) == 1


def test_transfer_guard_rejects_a_host_batch(f32_bench):
  # Negative control: an implicit host-to-device copy inside the guard raises.
  bench = f32_bench("dcl_cstp")
  host_batch = jax.device_get(bench.batch)
  with pytest.raises(Exception, match="[Dd]isallowed"):
    with jax.transfer_guard("disallow"):
      bench.step_fn(bench.state, host_batch)


def test_count_traces_sees_retracing():
  class M:
    def train_step(self, x):
      return x + 1

  m = M()
  counter = guards.count_traces(m)
  f = jax.jit(lambda x: m.train_step(x))
  f(jnp.ones(2))
  f(jnp.ones(2))
  assert counter["traces"] == 1
  f(jnp.ones(3))
  assert counter["traces"] == 2


# ------------------------------------------------------------------ donation


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_state_is_donated(name, f32_bench):
  bench = f32_bench(name)
  fields = bench.compile()
  assert fields["donation_warnings"] == []
  per_device = {"params": bench.state.params, "opt_state": bench.state.opt_state,
                "extras": bench.state.extras}
  donated = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(per_device))
  assert fields["memory"]["alias_size_in_bytes"] >= donated
  assert bench.undonated() == []  # Every leaf of the old state was consumed.
  if name == "dcl_cstp":
    assert {"bank", "momentum_params", "momentum_stats"} <= set(per_device["extras"])


def test_donation_guards_detect_a_kept_buffer():
  # Negative control: a donated input with no output of its shape cannot be reused.
  f = jax.jit(lambda x, y: (x.sum(), y * 2), donate_argnums=(0, 1))
  x, y = jnp.ones((4,)), jnp.ones((3,))
  with guards.donation_warnings() as found:
    f(x, y)
  assert len(found) == 1 and guards.DONATION_WARNING in found[0]
  assert guards.undonated({"x": x, "y": y}) == ["['x']"]


# ------------------------------------------------------------------ bf16


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_bf16_step_runs_convs_and_matmuls_in_bf16(name):
  c, batch, prepare = WORKLOADS[name](dtype="bfloat16")
  with steps.built(c, batch, prepare) as bench:
    report = guards.matmul_dtypes(bench.step_fn.lower(bench.state, bench.batch).as_text())
  assert report["count"] > 0
  assert set(report["convolution"]) == {"bf16"}, report["f32_ops"]
  assert report["bf16_fraction"] >= 0.99, report["f32_ops"]


def test_bf16_guard_fails_on_a_float32_step(f32_bench):
  # Negative control: the same check on the float32 step finds no bf16 at all.
  bench = f32_bench("dcl_cstp")
  report = guards.matmul_dtypes(bench.step_fn.lower(bench.state, bench.batch).as_text())
  assert set(report["convolution"]) == {"f32"} and report["bf16_fraction"] == 0.0
