"""Optimizers: gradient accumulation (optim.accumulate_steps) equals one large batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax import config_lib
from medrep_jax.core import optim
from medrep_jax.core.state import TrainState


def _loss(params, x, y):
  """Mean squared error of a two-layer MLP (no batch-dependent layers)."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def _problem(batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(5, 8)).astype(np.float32),
            "b1": np.zeros(8, np.float32),
            "w2": rng.normal(size=(8, 3)).astype(np.float32)}
  x = rng.normal(size=(batch, 5)).astype(np.float32)
  y = rng.normal(size=(batch, 3)).astype(np.float32)
  return params, x, y


def _optim_cfg(name: str, accumulate: int):
  c = config_lib.base_config("test").optim
  c.name = name
  c.lr = 0.05
  c.schedule = "cosine"
  c.warmup_fraction = 0.25
  c.grad_clip = 1.0
  c.accumulate_steps = accumulate
  return c


def _train(name: str, accumulate: int, updates: int, params, x, y):
  """Runs `updates * accumulate` micro-steps over consecutive chunks of (x, y)."""
  tx, _ = optim.make_optimizer(_optim_cfg(name, accumulate), updates * accumulate)
  state = TrainState.create(params=params, tx=tx)
  step = jax.jit(lambda s, xs, ys: s.apply_gradients(jax.grad(_loss)(s.params, xs, ys)))
  chunks = updates * accumulate
  history = []
  for xs, ys in zip(np.split(x, chunks), np.split(y, chunks)):
    state = step(state, xs, ys)
    history.append(state.params)
  return state, history


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_accumulated_micro_steps_equal_one_large_batch(name):
  k, updates, micro_batch = 4, 3, 6
  params, x, y = _problem(k * updates * micro_batch)
  big, _ = _train(name, 1, updates, params, x, y)
  acc, history = _train(name, k, updates, params, x, y)
  assert int(acc.step) == k * updates and int(big.step) == updates
  for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # Parameters change only on every k-th micro-step (from the second update: the first one
  # has lr 0 at the start of the linear warmup).
  for i in range(k, k * updates):
    moved = any(not np.array_equal(a, b) for a, b in
                zip(jax.tree.leaves(history[i]), jax.tree.leaves(history[i - 1])))
    assert moved == ((i + 1) % k == 0), f"micro-step {i + 1}"


def test_without_accumulation_micro_batches_differ():
  """The equivalence above is not trivial: plain steps on the micro-batches differ."""
  params, x, y = _problem(24)
  big, _ = _train("sgd", 1, 2, params, x, y)
  small, _ = _train("sgd", 1, 8, params, x, y)
  assert not np.allclose(big.params["w1"], small.params["w1"], atol=1e-4)


def test_schedule_counts_optimizer_updates():
  _, schedule = optim.make_optimizer(_optim_cfg("sgd", 4), 40)
  # 10 updates with 25% warmup: peak lr at update 2 (of 10), not at micro-step 10.
  np.testing.assert_allclose(schedule(2), 0.05, rtol=1e-6)
  assert float(schedule(9)) < 0.01


def test_accumulate_steps_must_be_positive():
  with pytest.raises(ValueError, match="accumulate_steps=0"):
    optim.make_optimizer(_optim_cfg("sgd", 0), 10)


def test_constant_then_linear_to_zero_schedule():
  """DRFL Sec. 4: the rate is constant for 30 of 60 epochs, then linear to zero."""
  c = config_lib.base_config("test").optim
  c.update(dict(lr=2e-4, schedule="constant_linear", constant_fraction=0.5))
  schedule = optim.make_schedule(c, 60)
  got = np.array([float(schedule(s)) for s in range(61)])
  ref = np.where(np.arange(61) < 30, 2e-4, 2e-4 * (1 - (np.arange(61) - 30) / 30))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12)
  assert got[-1] == 0.0 and got[29] == pytest.approx(2e-4)
  c.constant_fraction = 0.25  # the held part follows the field
  assert float(optim.make_schedule(c, 60)(20)) < 2e-4
  c.constant_fraction = 1.5
  with pytest.raises(ValueError, match="constant_fraction"):
    optim.make_schedule(c, 60)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_b1_is_a_config_field(name):
  """optim.b1 reaches Adam: the second update differs between b1 = 0.9 and 0.5 (the
  first is sign(g)·lr for any b1), and matches a NumPy Adam with that b1."""
  params, x, y = _problem(8)
  outs = {}
  for b1 in (0.9, 0.5):
    c = _optim_cfg(name, 1)
    c.update(dict(b1=b1, schedule="constant", warmup_fraction=0.0, grad_clip=0.0,
                  weight_decay=0.0))
    tx, _ = optim.make_optimizer(c, 10)
    state = TrainState.create(params=params, tx=tx)
    grads = []
    for _ in range(2):
      g = jax.grad(_loss)(state.params, x, y)
      grads.append(np.asarray(g["w2"], np.float64))
      state = state.apply_gradients(g)
    outs[b1] = np.asarray(state.params["w2"])
    # NumPy Adam (eps 1e-8, b2 0.999) on the recorded gradients of w2.
    w, m, v = np.asarray(params["w2"], np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
      m = b1 * m + (1 - b1) * g
      v = 0.999 * v + 0.001 * g * g
      w = w - 0.05 * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(outs[b1], w, rtol=1e-4, atol=1e-6)
  assert not np.allclose(outs[0.9], outs[0.5], atol=1e-6)
