"""FID InceptionV3 weights from a user-supplied file, and the Inception feature network.

No weights can be downloaded by this library. Users who have the FID Inception
weights of the common PyTorch FID port (``pt_inception-2015-12-05-*.pth``, the
2015-12-05 TF graph) point `load_inception_params` or `InceptionFeatures` at that file,
or at an ``.npz`` made from it once with

  python -m medrep_jax.eval.inception_weights convert IN.pth OUT.npz   # needs torch

An ``.npz`` holds the state dict as arrays under the PyTorch key names
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...), so the
file is readable without torch. ``fc.*`` (the 1008-way classifier) and
``*.num_batches_tracked`` are ignored. Every other key must match exactly
(`InceptionV3FID` mirrors the PyTorch module names); anything else raises a
ValueError that names the keys and shapes.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medrep_jax.eval import weight_files
from medrep_jax.models.inception import InceptionV3FID, variable_shapes

FID_SIZE = 299
FEATURE_DIM = 2048
TORCH_SUFFIXES = (".pth", ".pt")
_IGNORED_PREFIXES = ("fc.",)
_IGNORED_SUFFIXES = (".num_batches_tracked",)

# flax (collection, leaf name) <-> PyTorch leaf name.
_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                  ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


@functools.cache
def _expected() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """PyTorch key -> (flax path incl. collection, PyTorch shape), for every variable."""
  table = {}
  for path, leaf in traverse_util.flatten_dict(variable_shapes()).items():
    collection, *modules, name = path
    key = ".".join([*modules, _LEAF_TO_TORCH[(collection, name)]])
    shape = tuple(leaf.shape)
    if name == "kernel":  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    table[key] = (path, shape)
  return table


def _ignored(key: str) -> bool:
  return key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


def _read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads an .npz or (with torch) a .pth/.pt state dict into numpy arrays."""
  if not path.is_file():
    raise FileNotFoundError(f"Inception weight file not found: {path}")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if suffix not in TORCH_SUFFIXES:
    raise ValueError(f"{path}: unsupported Inception weight file type {suffix!r}; "
                     f"expected .npz or one of {TORCH_SUFFIXES}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading {path} (a PyTorch state dict) needs torch, which is not installed. "
        "Either `pip install torch` (CPU is enough), or convert it once on a machine "
        "with torch: `python -m medrep_jax.eval.inception_weights convert "
        f"{path.name} {path.stem}.npz`, and pass the .npz instead.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
    state = {k[len("module."):]: v for k, v in state.items()}
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def state_dict_to_variables(state: dict[str, np.ndarray], *, source: str = "state dict",
                            strict: bool = True) -> dict[str, Any]:
  """Validates a PyTorch-named state dict and converts it to flax variables.

  Args:
    state: PyTorch key -> array (OIHW conv weights, BN weight/bias/running stats).
    source: what to call the input in error messages (usually the file name).
    strict: also reject keys that are neither expected nor ignored (``fc.*``,
      ``*.num_batches_tracked``), e.g. the ``AuxLogits.*`` of torchvision's
      ImageNet InceptionV3, whose weights are not the FID ones.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for `InceptionV3FID`, float32 numpy arrays.

  Raises:
    ValueError: listing missing keys, shape mismatches and (strict) unexpected keys.
  """
  expected = _expected()
  problems = weight_files.key_problems(state, {k: s for k, (_, s) in expected.items()},
                                       strict=strict, ignored=_ignored)
  if problems:
    raise ValueError(f"{source} is not an FID InceptionV3 state dict: "
                     + "; ".join(problems))
  flat = {}
  for key, (path, _) in expected.items():
    value = np.asarray(state[key], np.float32)
    flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  return traverse_util.unflatten_dict(flat)


def variables_to_state_dict(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_variables`: PyTorch key names, OIHW conv weights."""
  flat = traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")})
  state = {}
  for key, (path, shape) in _expected().items():
    if path not in flat:
      raise ValueError(f"variables lack {'/'.join(path)} (PyTorch key {key})")
    value = np.asarray(flat[path], np.float32)
    state[key] = value.transpose(3, 2, 0, 1) if path[-1] == "kernel" else value
    if state[key].shape != shape:
      raise ValueError(f"{'/'.join(path)}: shape {state[key].shape} does not map to "
                       f"{key} {shape}")
  return state


def load_inception_params(path: str | os.PathLike, *, strict: bool = True) -> dict[str, Any]:
  """Loads FID InceptionV3 variables from an .npz or a PyTorch .pth/.pt state dict.

  Args:
    path: the weight file; ``.pth``/``.pt`` needs torch (ImportError otherwise, which
      says how to convert to ``.npz``).
    strict: reject unexpected keys (see `state_dict_to_variables`).

  Returns:
    ``{"params", "batch_stats"}`` of float32 numpy arrays for `InceptionV3FID.apply`
    (put them on device once, e.g. with `jax.device_put`, before repeated calls).
  """
  path = pathlib.Path(path)
  return state_dict_to_variables(_read_state_dict(path), source=str(path), strict=strict)


def export_npz(variables: dict[str, Any], path: str | os.PathLike) -> pathlib.Path:
  """Writes flax InceptionV3FID variables as an .npz under the PyTorch key names."""
  path = pathlib.Path(path)
  if path.suffix.lower() != ".npz":
    raise ValueError(f"export_npz writes .npz files, got {path}")
  np.savez(path, **variables_to_state_dict(variables))
  return path


def resize_for_inception(images: jnp.ndarray, size: int = FID_SIZE) -> jnp.ndarray:
  """(N, H, W, 1|3) in [0, 1] -> (N, size, size, 3) in [-1, 1].

  Bilinear with half-pixel centres and no antialiasing, which is PyTorch's
  ``F.interpolate(mode="bilinear", align_corners=False)`` used by the FID port.
  """
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  if (h, w) != (size, size):
    images = jax.image.resize(images, (n, size, size, c), method="linear", antialias=False)
  return images * 2.0 - 1.0


_resize_jit = jax.jit(resize_for_inception, static_argnums=1)


@functools.partial(jax.jit, static_argnums=0)
def _pool3(model: InceptionV3FID, variables: dict[str, Any], x: jnp.ndarray) -> jnp.ndarray:
  return model.apply(variables, x)


class InceptionFeatures:
  """FID InceptionV3 pool3 features of images: a pluggable feature network.

  ``InceptionFeatures("pt_inception.npz")(images)`` maps (N, H, W, C) float images in
  [0, 1], C in {1, 3}, to (N, 2048) float64 features (computed in float32). Grey images are repeated to RGB;
  images are resized to 299x299 (bilinear) and scaled to [-1, 1], as in the FID port.
  The network runs jitted in fixed-size batches (the last one is padded), so it
  compiles once per batch size.

  Attributes:
    label: "InceptionV3 (FID weights from <file name>)", for metric reports.
    dim: feature size, 2048.
  """

  def __init__(self, path: str | os.PathLike, *, batch_size: int = 32,
               precision: Any = "highest"):
    """Loads the weights (see `load_inception_params`).

    Args:
      path: .npz or PyTorch .pth/.pt FID Inception weight file.
      batch_size: images per jitted call.
      precision: convolution precision; "highest" keeps float32 on GPU/TPU.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.path = pathlib.Path(path)
    self.batch_size = batch_size
    self.dim = FEATURE_DIM
    self.label = f"InceptionV3 (FID weights from {self.path.name})"
    self._model = InceptionV3FID(precision=precision)
    self._variables = jax.device_put(load_inception_params(self.path))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be (N, H, W, C) with C in {{1, 3}}, got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype} "
                       "(divide integer images by their maximum, e.g. 255)")
    n = len(images)
    if n == 0:
      return np.zeros((0, self.dim), np.float64)
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
      raise ValueError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    images = np.clip(images, 0.0, 1.0).astype(np.float32)
    bs = min(self.batch_size, n)
    out = []
    for start in range(0, n, bs):
      chunk = images[start:start + bs]
      if len(chunk) < bs:
        pad = np.zeros((bs - len(chunk), *chunk.shape[1:]), np.float32)
        chunk = np.concatenate([chunk, pad])
      feats = _pool3(self._model, self._variables, _resize_jit(jnp.asarray(chunk)))
      out.append(np.asarray(feats)[:min(bs, n - start)])
    return np.concatenate(out).astype(np.float64)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: ``convert IN.pth OUT.npz`` (validates the weights on the way)."""
  parser = argparse.ArgumentParser(prog="python -m medrep_jax.eval.inception_weights",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  convert = sub.add_parser("convert", help="PyTorch FID Inception state dict -> .npz")
  convert.add_argument("src", help="input .pth/.pt (or .npz) weight file")
  convert.add_argument("dst", help="output .npz")
  args = parser.parse_args(argv)
  try:
    variables = load_inception_params(args.src)
  except (OSError, ImportError, ValueError) as e:
    parser.error(str(e))
  dst = export_npz(variables, args.dst)
  n = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {dst}: {len(_expected())} arrays, {n:,} parameters (fc.* dropped)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
