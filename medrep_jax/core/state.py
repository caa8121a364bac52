"""The train state: every copy of the weights and every piece of mutable state.

Fields are explicit so that a momentum encoder, an EMA copy, a frozen teacher or a memory
bank is visible to checkpointing and sharding alike (DESIGN.md, principle 2).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import serialization
from flax import struct


class TrainState(struct.PyTreeNode):
  """Params, optimizer state, model state (e.g. batch_stats) and method extras.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied.
    params: the trained parameters (fp32).
    opt_state: the optax state of `tx`.
    model_state: non-trained collections of the model, e.g. `{"batch_stats": ...}`.
    extras: method-owned state, e.g. `{"momentum_params": ..., "bank": ..., "ema": ...}`.
    tx: the optax transformation (static). It stays in the state so that one update rule
      goes with one set of optimizer statistics; the model is not here: a method owns it
      (`Method.model`), and the state is only data.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = struct.field(default_factory=dict)
  extras: Any = struct.field(default_factory=dict)
  tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, *, params, tx, model_state=None, extras=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               model_state=model_state or {}, extras=extras or {}, tx=tx)

  def apply_gradients(self, grads, **changes) -> "TrainState":
    """One optimizer update; `changes` replace other fields (e.g. model_state)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

  def variables(self) -> dict:
    """The flax variables dict `{"params": ..., **model_state}` for `apply`."""
    return {"params": self.params, **self.model_state}


def state_dict(state: TrainState) -> dict:
  """The checkpointable pytree of a state (plain nested dicts of arrays)."""
  return serialization.to_state_dict(
      {"step": state.step, "params": state.params, "opt_state": state.opt_state,
       "model_state": state.model_state, "extras": state.extras})


def from_state_dict(state: TrainState, restored: dict) -> TrainState:
  """Inverse of `state_dict`, using `state` as the structure template."""
  template = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
              "model_state": state.model_state, "extras": state.extras}
  values = serialization.from_state_dict(template, restored)
  return state.replace(**values)
