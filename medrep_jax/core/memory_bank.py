"""A MoCo memory bank (queue) of K l2-normalized keys, sharded along K on the "data" axis.

The bank is plain state in `TrainState.extras`: `extras["bank"]` is a (K, D) float32 array
and `extras["bank_ptr"]` an int32 scalar (DCL-CsTP eq. 3-4; K = 4,096 or 512).

Layout (the one definition both enqueues implement). With n shards the bank is n
contiguous blocks of S = K / n rows and the global batch is n contiguous blocks of
b = B / n rows, as `NamedSharding` lays them out on the "data" axis. Enqueue writes

    block d of the keys  ->  rows [ptr, ptr + b) of block d of the bank,
    ptr  ->  (ptr + b) % S,

so `ptr` is the write position inside every block ("device-major interleaved" ring).
With n = 1 this is the plain ring buffer: rows [ptr, ptr + B), ptr -> (ptr + B) % K.
`enqueue(bank, ptr, keys, num_shards=n)` computes it on global arrays;
`enqueue_sharded(bank, ptr, keys, mesh)` computes it with `jax.shard_map`, each device
writing its own keys into its own shard: no all-gather, no host round-trip. The two are
identical row for row when n is the size of the mesh's "data" axis.

Relation to the plain ring (n = 1) of the same batches: both hold the same SET of keys
once a full cycle of K / B batches has been written. Row for row, with T = K / B, a bank
in n-shard layout at pointer t·b equals the ring bank at pointer t·B with its rows
permuted, `ring.reshape(T, n, b, D).transpose(1, 0, 2, 3).reshape(K, D)`, and enqueue
commutes with that permutation (`relayout` converts; the losses are invariant to it).
The layout depends on n, so resuming on another device count should call `relayout`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medrep_jax.config_lib import ConfigError
from medrep_jax.core.mesh import DATA


def bank_sharding(mesh: Mesh) -> NamedSharding:
  """The bank's sharding: rows (K) split over "data", replicated over other axes."""
  return NamedSharding(mesh, P(DATA, None))


def check_bank(num_keys: int, global_batch: int, dataset_size: int | None = None,
               n_devices: int = 1) -> None:
  """Raises ConfigError unless the bank size K fits the batch, the devices and the data.

  The messages name the config fields that fix them (`loss.bank_size`,
  `train.batch_size`).

  Args:
    num_keys: K, the number of keys in the bank (`loss.bank_size`).
    global_batch: B, keys enqueued per step (the global batch, `train.batch_size`).
    dataset_size: number of training examples, or None if unknown (check skipped).
    n_devices: size of the "data" mesh axis the bank is sharded over.
  """
  if num_keys <= 0 or global_batch <= 0 or n_devices <= 0:
    raise ConfigError(f"memory bank: K={num_keys} (loss.bank_size), batch={global_batch} "
                      f"(train.batch_size) and devices={n_devices} must be positive")
  if global_batch % n_devices:
    raise ConfigError(f"memory bank: the global batch {global_batch} must be divisible by "
                      f"the {n_devices} devices on the '{DATA}' axis; set train.batch_size "
                      f"to a multiple of {n_devices}")
  if num_keys % n_devices:
    raise ConfigError(f"memory bank: K={num_keys} keys must be divisible by the {n_devices} "
                      f"devices on the '{DATA}' axis (the bank is sharded along K); set "
                      f"loss.bank_size to a multiple of {n_devices}")
  if num_keys % global_batch:
    raise ConfigError(f"memory bank: K={num_keys} keys must be divisible by the global "
                      f"batch {global_batch}, so that a batch never wraps around the queue; "
                      f"set loss.bank_size to a multiple of train.batch_size={global_batch}")
  if dataset_size is not None and num_keys > dataset_size:
    most = dataset_size - dataset_size % global_batch
    raise ConfigError(f"memory bank: K={num_keys} keys exceed the {dataset_size} training "
                      f"examples; the queue would hold stale copies of the same images. "
                      f"Set loss.bank_size to at most {dataset_size}"
                      f"{f' (a multiple of train.batch_size, e.g. {most})' if most > 0 else ''}"
                      f", or use more training data")


def fit_bank(num_keys: int, global_batch: int, dataset_size: int, n_devices: int = 1) -> int:
  """The largest valid K <= num_keys for `dataset_size` training examples (`loss.bank_auto`):
  a multiple of the global batch and of the devices, and no more keys than examples.

  Raises:
    ConfigError: the data hold fewer examples than one batch, so no bank fits.
  """
  step = math.lcm(max(int(global_batch), 1), max(int(n_devices), 1))
  k = min(int(num_keys), int(dataset_size)) // step * step
  if k <= 0:
    raise ConfigError(f"memory bank: {dataset_size} training examples hold no bank of whole "
                      f"batches (train.batch_size={global_batch}, {n_devices} device(s)); "
                      f"use more training data or a smaller train.batch_size")
  return k


def init_bank(rng: jax.Array, num_keys: int, dim: int,
              dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """(bank, ptr): K random unit-norm keys (K, D) and the pointer 0 (int32 scalar)."""
  bank = jax.random.normal(rng, (num_keys, dim), jnp.float32)
  bank = bank / jnp.linalg.norm(bank, axis=-1, keepdims=True)
  return bank.astype(dtype), jnp.zeros((), jnp.int32)


def _shapes(bank, keys, num_shards: int) -> tuple[int, int, int]:
  """(S, b, D): keys per bank block and per batch block; validates shapes."""
  if bank.ndim != 2 or keys.ndim != 2 or keys.shape[1] != bank.shape[1]:
    raise ValueError(f"enqueue: bank (K, D) and keys (B, D) expected, got {bank.shape} "
                     f"and {keys.shape}")
  (k, d), bsz = bank.shape, keys.shape[0]
  check_bank(k, bsz, n_devices=num_shards)
  return k // num_shards, bsz // num_shards, d


def _write(bank, ptr, keys, num_shards: int):
  """The layout's definition on (possibly local) arrays; see the module docstring."""
  s, b, d = _shapes(bank, keys, num_shards)
  blocks = bank.reshape(num_shards, s, d)
  new = jax.lax.stop_gradient(keys).astype(bank.dtype).reshape(num_shards, b, d)
  ptr = jnp.asarray(ptr, jnp.int32)
  blocks = jax.lax.dynamic_update_slice(blocks, new, (jnp.int32(0), ptr, jnp.int32(0)))
  return blocks.reshape(num_shards * s, d), (ptr + b) % s


def enqueue(bank: jax.Array, ptr: jax.Array, keys: jax.Array,
            num_shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """Writes B keys into the ring (module docstring); returns (new_bank, new_ptr).

  With `num_shards=1`: rows [ptr, ptr + B) get the keys and new_ptr = (ptr + B) % K.
  With `num_shards=n`: the n-block layout that `enqueue_sharded` produces on n devices.
  Requires K % B == 0 (and n | B, n | K); `ptr` must be a multiple of B / n.
  Keys should be l2-normalized; their gradient is stopped and they are cast to the bank dtype.
  """
  return _write(bank, ptr, keys, num_shards)


def enqueue_sharded(bank: jax.Array, ptr: jax.Array, keys: jax.Array,
                    mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """`enqueue(..., num_shards=n)` with each device writing its own keys into its own shard.

  Use inside the jitted train step. `bank` is sharded as `bank_sharding(mesh)`, `keys`
  along the batch on "data" (as the batch is), `ptr` is replicated; n = mesh.shape["data"].
  The result keeps the bank's sharding and needs no communication.
  """
  n = mesh.shape[DATA]
  _shapes(bank, keys, n)  # Clear errors on global shapes before shard_map's own.

  def local(bank_shard, ptr_, keys_shard):
    return _write(bank_shard, ptr_, keys_shard, 1)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA, None), P(), P(DATA, None)),
                       out_specs=(P(DATA, None), P()))(bank, ptr, keys)


def relayout(bank: jax.Array, ptr: jax.Array, global_batch: int, from_shards: int,
             to_shards: int) -> tuple[jax.Array, jax.Array]:
  """Converts a bank between n-shard layouts (e.g. resuming on another device count).

  Exact: the result equals what the `to_shards` layout would hold after the same enqueues.
  Requires the same global batch before and after. `ptr` must be concrete (host value).
  """
  k, d = bank.shape
  check_bank(k, global_batch, n_devices=from_shards)
  check_bank(k, global_batch, n_devices=to_shards)
  t = k // global_batch
  slot = int(ptr) // (global_batch // from_shards)  # batches written in this cycle
  ring = bank.reshape(from_shards, t, global_batch // from_shards, d).transpose(1, 0, 2, 3)
  out = ring.reshape(t, to_shards, global_batch // to_shards, d).transpose(1, 0, 2, 3)
  return out.reshape(k, d), jnp.asarray(slot * (global_batch // to_shards), jnp.int32)
