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

STATS_FROM_TORCH = {torch_name: flax_name for flax_name, torch_name in TORCH_STATS.items()}


def walk(tree: Mapping[str, Any], path: list[str], full: str) -> Mapping[str, Any]:
  node = tree
  for key in path:
    if key not in node:
      raise KeyError(f"no flax variable for torch tensor {full!r} (missing {key!r})")
    node = node[key]
  return node


def flax_value(module: nn.Module, leaf: str, node: Mapping[str, Any],
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
              batch_stats: Mapping[str, Any] | None = None, named_leaves: bool = False) -> None:
  """Loads flax ``params`` (and BatchNorm ``batch_stats``) into ``model`` in place.

  Args:
    model: a torch module named like the flax module (see module docstring).
    params: the flax ``"params"`` collection of the same module.
    batch_stats: its ``"batch_stats"`` collection; None keeps torch's running stats.
    named_leaves: copy a torch leaf that the flax module holds under the same name (other
      than ``bias``: a PReLU slope, a gate, a position embedding) as it is.

  Raises:
    KeyError: a torch tensor has no flax counterpart (the layouts differ).
  """
  modules = dict(model.named_modules())
  state = {}
  for name, tensor in model.state_dict().items():
    prefix, _, leaf = name.rpartition(".")
    path = prefix.split(".") if prefix else []
    if leaf == "num_batches_tracked" or (leaf in STATS_FROM_TORCH and batch_stats is None):
      state[name] = tensor
      continue
    if leaf in STATS_FROM_TORCH:
      value = np.asarray(walk(batch_stats, path, name)[STATS_FROM_TORCH[leaf]])
    else:
      node = walk(params, path, name)
      if named_leaves and leaf in node and leaf != "bias":
        value = np.asarray(node[leaf])
      else:
        value = flax_value(modules[prefix], leaf, node, tensor.shape)
    state[name] = torch.from_numpy(np.array(value, np.float32)).reshape(tensor.shape)
  model.load_state_dict(state)
