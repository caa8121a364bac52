"""Exports a finished run's weights for use outside medrep_jax.

  python -m medrep_jax.export --workdir runs/ft --format safetensors --output exports/ft

Formats (`FORMATS`), each written with a `model.json` that describes the architecture (the
flax module and its fields, the run's `config.model`), the input and its preprocessing
(the run's own host transforms), the outputs and classes, and every exported array:

* `safetensors`: `variables.safetensors`, flat `"params/encoder/stem_conv/kernel" -> array`
  (the paths of the nested flax variables joined by "/"), flax layouts (HWIO kernels).
* `msgpack`: `variables.msgpack`, `flax.serialization.msgpack_serialize` of the nested
  variables; `flax.serialization.msgpack_restore` reads it back.
* `torch`: `state_dict.pt`, a PyTorch state dict (OIHW conv kernels, (out, in) linear
  weights, BatchNorm running_mean/running_var/num_batches_tracked) that loads with
  `load_state_dict(strict=True)` into the reference networks of `benchmarks/torch_ref`
  (`unet.build(json.load(open("model.json")))`): classifiers and U-Nets over a ResNet or
  classic U-Net encoder, or such an encoder alone (`--submodule encoder`).

The variables are the parameters and the model-state collections (BatchNorm statistics)
of the run's model, as `methods.load_trained` loads them; `--include_extras` adds the
train state's extras (EMA weights, momentum encoders, LDM latent scale) to the first two
formats. The flax -> torch mapping here is pure numpy; torch is imported only to save.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import numpy as np
from flax import serialization

from medrep_jax import errors, methods, quiet
from medrep_jax.models import resnet, unet

FORMATS = ("safetensors", "msgpack", "torch")
WEIGHTS_FILE = {"safetensors": "variables.safetensors", "msgpack": "variables.msgpack",
                "torch": "state_dict.pt"}
TORCH_STATS = {"mean": "running_mean", "var": "running_var"}  # flax batch_stats -> torch
_SIMPLE = (bool, int, float, str, type(None))
# Errors a user can act on: one paragraph, no traceback, exit code 2 (unless --debug).
USER_ERRORS = (ValueError, OSError, KeyError, errors.WorkdirError)
EXIT_USER_ERROR = 2


class ExportError(ValueError):
  """The run cannot be exported as asked (format, submodule, architecture)."""


# ---------------------------------------------------------------- flat arrays


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict of arrays -> `{"a/b/c": array}` in insertion order."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = np.asarray(value)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{"a/b/c": array}` -> nested dict; the inverse of `flatten`."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


# ---------------------------------------------------------------- flax -> torch (numpy)


def torch_kernel(kernel: np.ndarray, kind: str,
                 shape: Sequence[int] | None = None) -> np.ndarray:
  """A flax kernel in torch's weight layout.

  Args:
    kernel: the flax `kernel`.
    kind: "conv" (HWIO -> OIHW; depth-wise HW1C -> C1HW), "conv_transpose" (flax applies
      the kernel unflipped to the dilated input, torch's ConvTranspose2d is the gradient of
      a conv: flip H and W, HWIO -> IOHW) or "linear" ((in axes..., out axes...) -> (out, in)).
    shape: the torch (out, in) shape of a linear weight whose flax kernel has more than two
      axes (DenseGeneral); None for a 2-D kernel.
  """
  kernel = np.asarray(kernel)
  if kind == "conv":
    return kernel.transpose(3, 2, 0, 1)
  if kind == "conv_transpose":
    return kernel[::-1, ::-1].transpose(2, 3, 0, 1)
  if kind == "linear":
    if shape is None:
      if kernel.ndim != 2:
        raise ValueError(f"a {kernel.ndim}-D linear kernel needs the torch (out, in) shape")
      return kernel.T
    out_dim, in_dim = shape
    return kernel.reshape(in_dim, out_dim).T
  raise ValueError(f"kind must be 'conv', 'conv_transpose' or 'linear', got {kind!r}")


def _torch_param(path: str, leaf: np.ndarray, transposed: frozenset[str]) -> tuple[str, np.ndarray]:
  module, _, name = path.rpartition("/")
  key = module.replace("/", ".")
  if name == "kernel":
    if leaf.ndim == 4:
      kind = "conv_transpose" if module in transposed else "conv"
    elif leaf.ndim == 2:
      kind = "linear"
    else:
      raise ExportError(f"no torch layout for the {leaf.ndim}-D kernel params/{path}")
    return f"{key}.weight", torch_kernel(leaf, kind)
  if name == "scale":
    return f"{key}.weight", leaf
  if name == "bias":
    return f"{key}.bias", leaf.reshape(-1)
  raise ExportError(f"no torch name for the flax parameter params/{path}")


def torch_state_dict(variables: Mapping[str, Any], *, conv_transpose: Sequence[str] = (),
                     num_batches_tracked: int = 0
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The torch state dict (numpy) of flax `variables` named like the flax modules.

  `params/encoder/layer1_0/conv1/kernel` becomes `encoder.layer1_0.conv1.weight`;
  `batch_stats/.../mean` and `var` become `running_mean` and `running_var`, with a
  `num_batches_tracked` per BatchNorm.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` (no other collection).
    conv_transpose: module paths ("decoder/up0") whose kernels are transposed convs.
    num_batches_tracked: the value of every BatchNorm's `num_batches_tracked`.

  Returns:
    (state dict, flax path -> torch name), the paths as `flatten` spells them.
  """
  extra = sorted(set(variables) - {"params", "batch_stats"})
  if extra:
    raise ExportError(f"--format torch maps params and batch_stats only; this model also "
                      f"has {extra}")
  transposed = frozenset(conv_transpose)
  state, names = {}, {}
  for path, leaf in flatten(variables.get("params", {})).items():
    name, value = _torch_param(path, leaf, transposed)
    names[f"params/{path}"], state[name] = name, value
  for path, leaf in flatten(variables.get("batch_stats", {})).items():
    module, _, name = path.rpartition("/")
    if name not in TORCH_STATS:
      raise ExportError(f"no torch name for the BatchNorm statistic batch_stats/{path}")
    key = module.replace("/", ".")
    names[f"batch_stats/{path}"] = f"{key}.{TORCH_STATS[name]}"
    state[f"{key}.{TORCH_STATS[name]}"] = leaf
    state[f"{key}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
  return state, names


# ---------------------------------------------------------------- what the torch export supports


def _resnet_preset(encoder: resnet.ResNet) -> str | None:
  for name in resnet.RESNET_NAMES:
    ref = resnet.get_resnet(name)
    if (tuple(ref.stage_sizes), ref.block, ref.num_filters) == (
        tuple(encoder.stage_sizes), encoder.block, encoder.num_filters):
      return name
  return None


def _encoder(module: nn.Module) -> nn.Module | None:
  try:
    enc = getattr(module, "encoder", None)
  except Exception:  # pylint: disable=broad-except  # a setup() attribute of an unbound module
    return None
  return unet.get_encoder(enc) if isinstance(enc, str) else enc


def _torch_encoder(encoder: Any) -> bool:
  # `benchmarks/torch_ref` is 2-D (Conv2d): a 3-D encoder ("resnet*_3d", "unet_encoder_3d",
  # spatial_dims=3) shares the 2-D presets' stage sizes but has no torch reference.
  if getattr(encoder, "spatial_dims", 2) != 2:
    return False
  return isinstance(encoder, unet.UNetEncoder) or (
      isinstance(encoder, resnet.ResNet) and _resnet_preset(encoder) is not None)


def torch_supported(module: nn.Module) -> bool:
  """Whether `benchmarks/torch_ref` has the network of `module`."""
  if isinstance(module, (unet.Classifier, unet.UNet)):
    return _torch_encoder(_encoder(module))
  return _torch_encoder(module)


TORCH_SUPPORTED = (f"unet.Classifier and unet.UNet (finetune, CAMContrast classifier) over a "
                   f"ResNet ({', '.join(resnet.RESNET_NAMES)}) or unet.UNetEncoder encoder, "
                   f"or such an encoder alone (--submodule encoder); 2-D only (no 3-D "
                   f"encoder: spatial_dims=3)")


def conv_transpose_paths(module: nn.Module, params: Mapping[str, Any]) -> list[str]:
  """The module paths of `module`'s transposed convs (a U-Net's "decoder/up<i>")."""
  if not isinstance(module, unet.UNet):
    return []
  return [f"decoder/{k}" for k in params.get("decoder", {}) if re.fullmatch(r"up\d+", k)]


# ---------------------------------------------------------------- model.json


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def _simple(value: Any) -> Any:
  """A JSON value for a simple module field, else None (the field is left out)."""
  value = _jsonable(value)
  if isinstance(value, _SIMPLE):
    return value
  if isinstance(value, list) and all(isinstance(v, _SIMPLE) for v in value):
    return value
  if isinstance(value, (type, np.dtype)):
    try:
      return np.dtype(value).name
    except TypeError:
      pass
  return None


def describe_module(module: nn.Module) -> dict[str, Any]:
  """`{"class": "medrep_jax.models.unet.UNet", "fields": {...}}`: the module's simple
  fields (numbers, strings, tuples of them, dtype names) and its module fields, nested;
  an encoder given by name is described as the module `unet.get_encoder` builds."""
  fields = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    value = getattr(module, f.name)
    if f.name == "encoder" and isinstance(value, str):
      value = unet.get_encoder(value)
    if isinstance(value, nn.Module):
      fields[f.name] = describe_module(value)
    elif value is None or _simple(value) is not None:
      fields[f.name] = _simple(value)
  cls = type(module)
  return {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}


def _transform(t: Any) -> dict[str, Any]:
  out = {"op": type(t).__name__}
  if dataclasses.is_dataclass(t):
    out.update({f.name: _jsonable(getattr(t, f.name)) for f in dataclasses.fields(t)})
  doc = (type(t).__doc__ or "").strip().splitlines()
  if doc:
    out["doc"] = doc[0]
  return out


def preprocessing(data_cfg: Any, transforms: Sequence[Any]) -> dict[str, Any]:
  """The run's host preprocessing: a summary and its transforms (`build_transforms`)."""
  size, channels = int(data_cfg.image_size), data_cfg.get("channels", None)
  mode = str(data_cfg.get("normalize", "unit"))
  steps = [f"resize to {size}x{size} (PIL bilinear, antialiased when shrinking)"]
  if channels:
    steps.append(f"convert to {channels} channel(s) (grey -> RGB repeats the channel, "
                 f"RGB -> grey is ITU-R 601-2 luma)")
  steps.append({"unit": "scale uint8 to [0, 1] (x / 255; float images with an HU window are "
                        "clipped to it and rescaled to [0, 1])",
                "standardize": "per-image standardization (x - mean) / std of the [0, 1] image",
                "none": "cast to float32 without scaling"}.get(mode, f"normalize {mode}"))
  return {"summary": "; ".join(steps), "normalize": mode,
          "transforms": [_transform(t) for t in transforms]}


def _outputs(trained: methods.Trained, module: nn.Module) -> tuple[dict | None, dict | None]:
  """(outputs, classes) of a classifier or U-Net (reads the dataset info they were built on)."""
  if not isinstance(module, (unet.Classifier, unet.UNet)):
    return None, None
  info, k = trained.stage.info, int(module.num_classes)
  if isinstance(module, unet.Classifier):
    loss = trained.config.get("loss", None)
    act = {"bce": "sigmoid", "ce": "softmax"}.get(loss) if isinstance(loss, str) else None
    outputs = {"name": "logits", "shape": ["batch", k], "activation": act}
    classes = {"num_classes": info.num_classes, "class_names": list(info.class_names),
               "multi_label": info.multi_label}
  else:
    outputs = {"name": "logits", "shape": ["batch", "height", "width", k],
               "activation": "sigmoid" if k == 1 else "softmax"}
    classes = {"num_mask_classes": info.num_mask_classes}
  return outputs, classes


def describe(trained: methods.Trained, module: nn.Module, variables: Mapping[str, Any],
             fmt: str, submodule: str | None) -> dict[str, Any]:
  """The `model.json` of an export (without the torch names; `export` adds them)."""
  c = trained.config
  size = int(c.data.image_size)
  channels = trained.stage.channels
  outputs, classes = _outputs(trained, module)
  arrays = [{"path": p, "shape": list(a.shape), "dtype": a.dtype.name}
            for p, a in flatten(variables).items()]
  try:
    version = importlib.metadata.version("medrep_jax")
  except importlib.metadata.PackageNotFoundError:
    version = None
  return _jsonable({
      "format": fmt, "weights_file": WEIGHTS_FILE[fmt], "medrep_jax_version": version,
      "run": {"workdir": str(trained.run.path), "method": c.method,
              "stage": c.get("stage", ""), "step": trained.run.step},
      "submodule": submodule,
      "architecture": describe_module(module),
      "config_model": c.model.to_dict() if "model" in c else None,
      "dtype": {"compute": str(c.get("dtype", "float32")), "params": "float32"},
      "input": {"image_size": [size, size], "channels": channels, "dtype": "float32",
                "layout": {"flax": "NHWC", "torch": "NCHW"}},
      "preprocessing": preprocessing(c.data, trained.stage.transforms("test")),
      "outputs": outputs, "classes": classes,
      "collections": list(variables),
      "num_parameters": int(sum(a.size for a in flatten(variables.get("params", {})).values())),
      "arrays": arrays,
  })


# ---------------------------------------------------------------- writing


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  os.replace(tmp, path)
  return path


def _write_safetensors(flat: dict[str, np.ndarray], path: pathlib.Path, meta: dict) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tmp = path.with_name(path.name + ".tmp")
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(tmp), metadata=meta)
  _replace(tmp, path)


def _write_torch(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError("--format torch needs PyTorch (pip install torch, or the [bench] "
                      "extra); safetensors and msgpack need no torch") from e
  tmp = path.with_name(path.name + ".tmp")
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, tmp)
  _replace(tmp, path)


def _write_weights(fmt: str, module: nn.Module, variables: dict, path: pathlib.Path,
                   desc: dict, step: int) -> None:
  """Writes `variables` as `fmt` to `path`; a torch export adds its names to `desc`."""
  if fmt == "safetensors":
    run = desc["run"]
    meta = {"format": "medrep_jax", "layout": "flax", "method": str(run["method"]),
            "stage": str(run["stage"]), "model_json": "model.json"}
    _write_safetensors(flatten(variables), path, meta)
  elif fmt == "msgpack":
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(variables))
    _replace(tmp, path)
  else:
    state, names = torch_state_dict(
        variables, conv_transpose=conv_transpose_paths(module, variables["params"]),
        num_batches_tracked=step)
    for entry in desc["arrays"]:
      entry["torch_name"] = names[entry["path"]]
      entry["torch_shape"] = list(state[entry["torch_name"]].shape)
    desc["torch"] = {
        "reference": "benchmarks/torch_ref/unet.py",
        "build": "benchmarks.torch_ref.unet.build(json.load(open('model.json')))",
        "layout": "NCHW", "load": "model.load_state_dict(torch.load(path), strict=True)",
        "other_tensors": sorted(set(state) - set(names.values()))}
    _write_torch(state, path)


def _module_and_variables(trained: methods.Trained, submodule: str | None):
  if submodule is None:
    return trained.model, trained.variables
  module = getattr(trained.model, submodule, None)
  if isinstance(module, str) and submodule == "encoder":
    module = unet.get_encoder(module)
  if not isinstance(module, nn.Module):
    raise ExportError(f"--submodule {submodule}: the {type(trained.model).__name__} model of "
                      f"{trained.run.path} has no such submodule")
  try:
    return module, trained.run.variables(submodule)
  except KeyError as e:
    raise ExportError(str(e.args[0])) from e


def export(workdir: str | os.PathLike, fmt: str, output: str | os.PathLike, *,
           submodule: str | None = None, include_extras: bool = False) -> dict[str, Any]:
  """Writes the weights of the run in `workdir` to `output` as `fmt`, with `model.json`.

  Args:
    workdir: a finished (or checkpointed) run directory of any method.
    fmt: one of `FORMATS`.
    output: the folder to write (created if missing; the two files are replaced).
    submodule: export this submodule only (e.g. "encoder" of a pretraining run).
    include_extras: also write the train state's extras (safetensors and msgpack only).

  Returns:
    The `model.json` content.

  Raises:
    ExportError: an unknown format, a model torch has no reference network for, a
      missing submodule, or extras asked with torch or a submodule.
  """
  if fmt not in FORMATS:
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
  if include_extras and (fmt == "torch" or submodule):
    raise ExportError("--include_extras writes the whole train state's extras: use it with "
                      "--format safetensors or msgpack and without --submodule")
  trained = methods.load_trained(workdir)
  module, variables = _module_and_variables(trained, submodule)
  variables = dict(variables)
  if include_extras and trained.run.extras:
    variables["extras"] = trained.run.extras
  if fmt == "torch" and not torch_supported(module):
    c = trained.config
    hint = (", or its encoder alone with --submodule encoder"
            if submodule is None and _torch_encoder(_encoder(module)) else "")
    raise ExportError(
        f"--format torch: {trained.run.path} ({c.method}, stage {c.get('stage', '')!r}) has "
        f"a {type(module).__name__} model, which has no PyTorch reference network. "
        f"Supported: {TORCH_SUPPORTED}. Export it with --format safetensors or msgpack{hint}")
  desc = describe(trained, module, variables, fmt, submodule)
  out = pathlib.Path(output).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  _write_weights(fmt, module, variables, out / WEIGHTS_FILE[fmt], desc, trained.run.step)
  tmp = out / "model.json.tmp"
  tmp.write_text(json.dumps(desc, indent=1) + "\n")
  _replace(tmp, out / "model.json")
  return desc


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m medrep_jax.export",
      description="Export a run's weights (parameters and batch statistics) with a JSON "
                  "description of the architecture and preprocessing.")
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                 help=f"one of: {', '.join(FORMATS)}")
  p.add_argument("--output", required=True, help="the folder to write")
  p.add_argument("--submodule", default=None,
                 help="export one submodule only, e.g. 'encoder' of a pretraining run")
  p.add_argument("--include_extras", action="store_true",
                 help="also write EMA weights, momentum encoders and other extras "
                      "(safetensors, msgpack)")
  p.add_argument("--debug", action="store_true", default=os.environ.get(
      "MEDREP_DEBUG", "") not in ("", "0"), help="show Python tracebacks (also MEDREP_DEBUG=1)")
  errors.add_verbose_flag(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit code: 0, or 2 after a one-paragraph error (as
  `medrep_jax.main`, `predict` and `evaluate`; `--debug` shows the traceback)."""
  args = _parser().parse_args(argv)
  try:
    desc = export(args.workdir, args.fmt, args.output, submodule=args.submodule,
                  include_extras=args.include_extras)
  except USER_ERRORS as e:  # ExportError, ConfigError and DataError are ValueErrors
    if args.debug:
      raise
    return errors.report(e)
  out = pathlib.Path(args.output)
  run = desc["run"]
  print(f"Exported {len(desc['arrays'])} arrays ({desc['num_parameters']:,} parameters) of "
        f"the {run['method']} run {run['workdir']} (step {run['step']}) to "
        f"{out / desc['weights_file']}, described in {out / 'model.json'}")
  return 0


if __name__ == "__main__":
  quiet.install(quiet.verbose_requested())  # library noise hidden unless --verbose
  sys.exit(main())
