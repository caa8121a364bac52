"""Device mesh, shardings, and the host-to-global-array step.

One `jax.jit` step with `NamedSharding` over a `Mesh` with axes ("data", "model")
(DESIGN.md, principle 3). The batch is sharded on "data"; state is replicated unless a
method says otherwise (e.g. the memory bank is sharded along K on "data").
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medrep_jax.config_lib import ConfigError

DATA = "data"
MODEL = "model"


def maybe_initialize_distributed(flag: bool) -> None:
  """Calls `jax.distributed.initialize()` for multi-host runs only.

  It runs when `flag` is true or the env var MEDREP_DISTRIBUTED=1 is set. On SLURM and
  TPU pods JAX discovers the coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (see launch/README.md).
  """
  if not (flag or os.environ.get("MEDREP_DISTRIBUTED") == "1"):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds a ("data", "model") mesh; `data=-1` takes all devices left after "model"."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  model = int(mesh_cfg.get("model", 1))
  data = int(mesh_cfg.get("data", -1))
  if data == -1:
    if n % model:
      raise ConfigError(f"mesh.model={model} does not divide the {n} devices")
    data = n // model
  if data * model != n:
    raise ConfigError(f"mesh data={data} x model={model} needs {data * model} devices, "
                     f"but {n} are visible")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  n = mesh.shape[DATA]
  if global_batch % n:
    raise ConfigError(f"{what}={global_batch} must be divisible by the {n} devices on the "
                     f"'data' mesh axis")
  if global_batch % jax.process_count():
    raise ConfigError(f"{what}={global_batch} must be divisible by the "
                     f"{jax.process_count()} processes")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles process-local batch rows into global arrays sharded on "data"."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def to_host(tree: Any) -> Any:
  """Fetches (and, on several hosts, all-gathers) a pytree of global arrays to numpy."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
