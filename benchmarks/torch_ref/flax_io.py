"""Copies flax variables into a torch module whose submodules carry the flax names.

The torch reference models name every submodule as its flax counterpart
(``encoder.layer1_0.conv1`` <-> ``params["encoder"]["layer1_0"]["conv1"]``),
so one path walk maps every tensor:

* ``Conv2d.weight`` <- ``kernel`` (HWIO -> OIHW; depth-wise HW1C -> C1HW);
* ``ConvTranspose2d.weight`` <- ``kernel`` (flipped HWIO -> IOHW);
* ``Linear.weight`` <- ``kernel`` ((in axes..., out axes...) -> (out, in));
* norm ``weight`` <- ``scale``; ``bias`` <- ``bias`` (flattened);
* BatchNorm ``running_mean`` / ``running_var`` <- ``batch_stats`` mean / var.

The layouts are those of ``medrep_jax.export`` (``torch_kernel``, ``TORCH_STATS``), which
writes whole state dicts from the flax side; this walks the torch side, so a torch model
may hold a subset of the flax variables and keep its own running statistics.

Used by tests that check the torch reference computes the JAX function on the
same weights, so a speed ratio compares frameworks, not architectures.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from medrep_jax.export import TORCH_STATS, torch_kernel

_STATS = {torch_name: flax_name for flax_name, torch_name in TORCH_STATS.items()}


def _walk(tree: Mapping[str, Any], path: list[str], full: str) -> Mapping[str, Any]:
  node = tree
  for key in path:
    if key not in node:
      raise KeyError(f"no flax variable for torch tensor {full!r} (missing {key!r})")
    node = node[key]
  return node


def _value(module: nn.Module, leaf: str, node: Mapping[str, Any],
           shape: torch.Size) -> np.ndarray:
  if leaf == "bias":
    return np.asarray(node["bias"]).reshape(-1)
  if "scale" in node:
    return np.asarray(node["scale"])
  kernel = np.asarray(node["kernel"])
  if isinstance(module, nn.Conv2d):
    return torch_kernel(kernel, "conv")
  if isinstance(module, nn.ConvTranspose2d):
    return torch_kernel(kernel, "conv_transpose")
  if isinstance(module, nn.Linear):
    return torch_kernel(kernel, "linear", shape)
  raise TypeError(f"cannot map a flax kernel onto {type(module).__name__}")


def load_flax(model: nn.Module, params: Mapping[str, Any],
              batch_stats: Mapping[str, Any] | None = None) -> None:
  """Loads flax ``params`` (and BatchNorm ``batch_stats``) into ``model`` in place.

  Args:
    model: a torch module named like the flax module (see module docstring).
    params: the flax ``"params"`` collection of the same module.
    batch_stats: its ``"batch_stats"`` collection; None keeps torch's running stats.

  Raises:
    KeyError: a torch tensor has no flax counterpart (the layouts differ).
  """
  modules = dict(model.named_modules())
  state = {}
  for name, tensor in model.state_dict().items():
    prefix, _, leaf = name.rpartition(".")
    path = prefix.split(".") if prefix else []
    if leaf == "num_batches_tracked" or (leaf in _STATS and batch_stats is None):
      state[name] = tensor
      continue
    if leaf in _STATS:
      value = np.asarray(_walk(batch_stats, path, name)[_STATS[leaf]])
    else:
      value = _value(modules[prefix], leaf, _walk(params, path, name), tensor.shape)
    state[name] = torch.from_numpy(np.array(value, np.float32)).reshape(tensor.shape)
  model.load_state_dict(state)
