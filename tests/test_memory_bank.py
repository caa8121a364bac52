"""Tests for medrep_jax.core.memory_bank: ring order, sharded enqueue, checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medrep_jax.core import memory_bank as mb

K, D = 32, 3


def _keys(step, batch):
  """Distinguishable keys: row i of step s is [s, i, 0]."""
  return jnp.stack([jnp.full((batch,), step, jnp.float32),
                    jnp.arange(batch, dtype=jnp.float32),
                    jnp.zeros((batch,), jnp.float32)], axis=1)


def _np_interleaved(bank, ptr, keys, n):
  """NumPy reference of the n-block layout, row by row."""
  bank = np.array(bank)
  s, b = len(bank) // n, len(keys) // n
  for i, key in enumerate(np.asarray(keys)):
    d, j = divmod(i, b)
    bank[d * s + (ptr + j) % s] = key
  return bank, (ptr + b) % s


def test_init_bank():
  bank, ptr = mb.init_bank(jax.random.key(0), K, 16)
  assert bank.shape == (K, 16) and bank.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(bank, axis=1), 1.0, rtol=1e-6)
  assert ptr.dtype == jnp.int32 and int(ptr) == 0


def test_single_device_ring_order_with_wraparound():
  bank, ptr = jnp.zeros((K, D)), jnp.zeros((), jnp.int32)
  step = jax.jit(mb.enqueue)
  for s in range(6):  # 6 batches of 8 into 32 rows: wraps after 4
    bank, ptr = step(bank, ptr, _keys(s + 1, 8))
    assert int(ptr) == ((s + 1) * 8) % K
  # Rows [0, 8) and [8, 16) were overwritten by steps 5 and 6; [16, 32) hold steps 3, 4.
  expected_step = np.repeat([5, 6, 3, 4], 8)
  np.testing.assert_array_equal(bank[:, 0], expected_step)
  np.testing.assert_array_equal(bank[:, 1], np.tile(np.arange(8), 4))
  # bf16 keys are cast to the bank dtype; gradients never flow into the bank.
  new_bank, _ = mb.enqueue(bank, ptr, _keys(7, 8).astype(jnp.bfloat16))
  assert new_bank.dtype == jnp.float32
  g = jax.grad(lambda x: mb.enqueue(bank, ptr, x)[0].sum())(_keys(7, 8))
  assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("n", [2, 8])
def test_interleaved_layout_matches_numpy(n):
  rng = np.random.default_rng(n)
  bank, ptr = jnp.asarray(rng.normal(size=(K, D)), jnp.float32), 0
  ref_bank, ref_ptr = np.asarray(bank), 0
  enq = jax.jit(mb.enqueue, static_argnames="num_shards")
  for s in range(5):
    keys = jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
    bank, ptr = enq(bank, ptr, keys, num_shards=n)
    ref_bank, ref_ptr = _np_interleaved(ref_bank, ref_ptr, keys, n)
    np.testing.assert_array_equal(bank, ref_bank)
    assert int(ptr) == ref_ptr


@functools.lru_cache
def _sharded_step(mesh):
  """A jitted step (donated bank) that enqueues with shard_map, as a train step does."""
  return jax.jit(functools.partial(mb.enqueue_sharded, mesh=mesh),
                 out_shardings=(mb.bank_sharding(mesh), NamedSharding(mesh, P())),
                 donate_argnums=0)


def _run_sharded(devices, batch, steps, bank0):
  mesh = Mesh(np.asarray(devices), ("data",))
  bank = jax.device_put(np.asarray(bank0), mb.bank_sharding(mesh))  # donated below
  ptr = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))
  for s in range(steps):
    keys = jax.device_put(_keys(s + 1, batch) + s, NamedSharding(mesh, P("data")))
    bank, ptr = _sharded_step(mesh)(bank, ptr, keys)
    assert bank.sharding.is_equivalent_to(mb.bank_sharding(mesh), 2)
  return mesh, bank, ptr


def test_sharded_enqueue_equals_single_device_and_stays_sharded():
  devices = jax.devices()
  assert len(devices) == 8, "conftest sets 8 fake CPU devices"
  bank0 = mb.init_bank(jax.random.key(1), K, D)[0]
  steps, batch = 7, 16  # 16 = 8 devices x 2 keys; wraps every 2 steps
  mesh, bank8, ptr8 = _run_sharded(devices, batch, steps, bank0)
  # Every device holds only its own 4-row block.
  assert {tuple(s.data.shape) for s in bank8.addressable_shards} == {(K // 8, D)}
  assert bank8.sharding.spec == P("data", None)
  # Each device writes its own keys into its own shard: no collective in the program.
  keys = jax.ShapeDtypeStruct((batch, D), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  hlo = _sharded_step(mesh).lower(bank8, ptr8, keys).compile().as_text()
  assert not [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
              if c in hlo]
  # The same global batches on 1 device, in the 8-block layout: identical row for row.
  ref, ref_ptr = bank0, jnp.zeros((), jnp.int32)
  for s in range(steps):
    ref, ref_ptr = mb.enqueue(ref, ref_ptr, _keys(s + 1, batch) + s, num_shards=8)
  np.testing.assert_array_equal(np.asarray(bank8), np.asarray(ref))
  assert int(ptr8) == int(ref_ptr) == (steps * 2) % 4
  # A 1-device mesh runs the same code path and gives the plain ring.
  _, bank1, ptr1 = _run_sharded(devices[:1], batch, steps, bank0)
  ring, ring_ptr = bank0, 0
  for s in range(steps):
    ring, ring_ptr = mb.enqueue(ring, ring_ptr, _keys(s + 1, batch) + s)
  np.testing.assert_array_equal(np.asarray(bank1), np.asarray(ring))
  assert int(ptr1) == int(ring_ptr) == (steps * batch) % K
  # After a full cycle (K / B = 2 batches) the two layouts hold the same set of keys,
  # related by the documented permutation, and relayout converts exactly.
  np.testing.assert_array_equal(np.sort(np.asarray(bank8), axis=0),
                                np.sort(np.asarray(bank1), axis=0))
  conv, conv_ptr = mb.relayout(np.asarray(bank1), ptr1, batch, from_shards=1, to_shards=8)
  np.testing.assert_array_equal(conv, np.asarray(bank8))
  assert int(conv_ptr) == int(ptr8)
  back, back_ptr = mb.relayout(conv, conv_ptr, batch, from_shards=8, to_shards=1)
  np.testing.assert_array_equal(back, np.asarray(bank1))
  assert int(back_ptr) == int(ptr1)


def test_relayout_commutes_with_enqueue():
  rng = np.random.default_rng(5)
  batch, n = 8, 4
  ring = jnp.asarray(rng.normal(size=(K, D)), jnp.float32)
  ring_ptr = jnp.int32(batch)  # one batch into the cycle
  inter, inter_ptr = mb.relayout(ring, ring_ptr, batch, 1, n)
  for _ in range(3):
    keys = jnp.asarray(rng.normal(size=(batch, D)), jnp.float32)
    ring, ring_ptr = mb.enqueue(ring, ring_ptr, keys)
    inter, inter_ptr = mb.enqueue(inter, inter_ptr, keys, num_shards=n)
    conv, conv_ptr = mb.relayout(ring, ring_ptr, batch, 1, n)
    np.testing.assert_array_equal(inter, conv)
    assert int(inter_ptr) == int(conv_ptr)


def test_check_bank_errors():
  mb.check_bank(4096, 128, dataset_size=10_000, n_devices=8)
  mb.check_bank(512, 128, dataset_size=None, n_devices=1)
  with pytest.raises(ValueError, match="divisible by the global batch"):
    mb.check_bank(4000, 128)
  with pytest.raises(ValueError, match="exceed the 1000 training examples"):
    mb.check_bank(4096, 128, dataset_size=1000)
  with pytest.raises(ValueError, match="K=36 keys must be divisible by the 8 devices"):
    mb.check_bank(36, 8, n_devices=8)
  with pytest.raises(ValueError, match="global batch 12 must be divisible by the 8"):
    mb.check_bank(96, 12, n_devices=8)
  with pytest.raises(ValueError, match="must be positive"):
    mb.check_bank(0, 8)
  bank, ptr = mb.init_bank(jax.random.key(0), 30, D)
  with pytest.raises(ValueError, match="K=30 keys must be divisible by the global batch 8"):
    mb.enqueue(bank, ptr, _keys(1, 8))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  with pytest.raises(ValueError, match="K=36 keys must be divisible by the 8 devices"):
    mb.enqueue_sharded(jnp.zeros((36, D)), ptr, _keys(1, 8), mesh)
  with pytest.raises(ValueError, match=r"bank \(K, D\) and keys \(B, D\)"):
    mb.enqueue(jnp.zeros((K, D)), ptr, jnp.zeros((8, D + 1)))
