"""Using a finished run: `medrep_jax.load(workdir)` -> embed, predict or sample.

    model = medrep_jax.load("runs/ft_seg")
    masks = model.predict("scans/")            # a folder, file paths or numpy arrays
    feats = medrep_jax.load("runs/dcl").embed(images)
    images = medrep_jax.load("runs/ldm/unet").sample(16)

Built only on the one model loader, `methods.load_trained` (which reads the run with
`core.runs.load_run`), so every method and stage loads the same way, finished or still
checkpointing. Inputs go through the run's own host preprocessing (`stage.transforms`:
resize, channels, normalize), one record at a time; batches have a fixed size (the last
one is padded), so each operation compiles once, on whatever device JAX has.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np

from medrep_jax import methods
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.data import imageio
from medrep_jax.data import transforms as transforms_lib
from medrep_jax.methods import base
from medrep_jax.models import unet

PathLike = str | os.PathLike
Images = np.ndarray | PathLike | Sequence[np.ndarray | PathLike]
_ARRAY_EXTS = (".npy",)


def load(workdir: PathLike, *, batch_size: int = 32) -> "TrainedModel":
  """Loads the run in `workdir` (finished, or with at least one checkpoint).

  Args:
    workdir: a run directory (for a pipeline, one stage's directory, e.g. runs/x/unet).
    batch_size: the fixed batch of every compiled call (the last batch is padded).

  Raises:
    FileNotFoundError: `workdir` is not a run directory or has no checkpoint.
    ValueError: the run is a stage that trains no model (sampling, heatmaps, ...).
  """
  return TrainedModel(methods.load_trained(workdir), batch_size=batch_size)


def list_inputs(images: Images) -> list[tuple[str, np.ndarray | pathlib.Path]]:
  """(name, array or file path) items of `images`, without reading any file.

  Args:
    images: a folder (its image files, sorted), a file path (.png, .jpg, ..., or .npy),
      a numpy array (N, H, W) or (N, H, W, C), a single (H, W) array, or a list of arrays
      (H, W[, C]) and paths. Names are file stems, or `image_00000`, ... for arrays.

  Raises:
    FileNotFoundError: a path does not exist, or a folder holds no image file.
    ValueError: an array of another rank.
  """
  if isinstance(images, (str, os.PathLike)):
    return _path_items(pathlib.Path(images).expanduser())
  if isinstance(images, (np.ndarray, jax.Array)):
    arr = np.asarray(images)
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim not in (3, 4):
      raise ValueError(f"an image array must be (N, H, W) or (N, H, W, C), or one (H, W) "
                       f"image; got shape {arr.shape}. Pass one colour image as image[None]")
    if not len(arr):
      raise ValueError(f"no images given: an array of shape {arr.shape}")
    return [(f"image_{i:05d}", a) for i, a in enumerate(arr)]
  items = []
  for i, item in enumerate(images):
    if isinstance(item, (str, os.PathLike)):
      items += _path_items(pathlib.Path(item).expanduser())
    else:
      arr = np.asarray(item)
      if arr.ndim not in (2, 3):
        raise ValueError(f"images[{i}] has shape {arr.shape}; each image in a list must be "
                         f"(H, W) or (H, W, C)")
      items.append((f"image_{i:05d}", arr))
  if not items:
    raise ValueError("no images given")
  return items


def _path_items(path: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  if path.is_dir():
    files = imageio.list_images(path) + sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _ARRAY_EXTS)
    if not files:
      raise FileNotFoundError(f"no image files ({', '.join(imageio.IMAGE_EXTS + _ARRAY_EXTS)})"
                              f" in {path}")
    return [(p.stem, p) for p in files]
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  return [(path.stem, path)]


class TrainedModel:
  """A finished run's model with the run's preprocessing; see `load`.

  What a run supports (`supports`): `embed` when its model has an `encoder` submodule,
  `predict` when its stage defines `predict` (classifiers, segmenters), `sample` when its
  stage samples (the LDM UNet).
  """

  def __init__(self, trained: methods.Trained, *, batch_size: int = 32):
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    self.trained = trained
    self.stage: base.Method = trained.stage
    self.config = trained.config
    self.batch_size = int(batch_size)
    self._cache: dict[str, tuple] = {}

  # ------------------------------------------------------------------------- description
  @property
  def path(self) -> pathlib.Path:
    return self.trained.run.path

  @property
  def name(self) -> str:
    stage = self.config.get("stage", "")
    return f"{self.config.method}" + (f"/{stage}" if stage else "")

  @functools.cached_property
  def supports(self) -> tuple[str, ...]:
    out = []
    if self._encoder is not None:
      out.append("embed")
    if hasattr(self.stage, "predict"):
      out.append("predict")
    if callable(getattr(self.stage, "sample", None)):
      out.append("sample")
    return tuple(out)

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @functools.cached_property
  def channels(self) -> int:
    return self.stage.channels

  @functools.cached_property
  def classes(self) -> tuple[str, ...]:
    """What `predict` scores, one name per probability column; () if it cannot predict."""
    return tuple(self.stage.predict_classes) if "predict" in self.supports else ()

  @functools.cached_property
  def task(self) -> str:
    """"classification" or "segmentation" for runs that predict, else ""."""
    if "predict" not in self.supports:
      return ""
    spec = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, self.channels),
                                np.float32)
    out = jax.eval_shape(self.stage.predict, self.trained.run.variables(), spec)
    return "segmentation" if "mask" in out else "classification"

  def info(self) -> dict[str, Any]:
    """Method, stage, step, what the run supports, input size and channels, classes."""
    out = {"workdir": str(self.path), "method": self.config.method,
           "stage": self.config.get("stage", ""), "step": self.trained.run.step,
           "supports": list(self.supports), "image_size": self.image_size,
           "channels": self.channels,
           "normalize": str(self.config.data.get("normalize", "unit"))}
    if "predict" in self.supports:
      out.update(task=self.task, classes=list(self.classes))
    return out

  def __repr__(self) -> str:
    i = self.info()
    classes = f", classes={i['classes']}" if "classes" in i else ""
    return (f"TrainedModel({self.name} at step {i['step']} from {i['workdir']}: "
            f"supports {', '.join(i['supports']) or 'nothing'}; input {i['image_size']}px "
            f"x {i['channels']} channel(s){classes})")

  def _require(self, what: str) -> None:
    if what not in self.supports:
      raise ValueError(f"the {self.name} run in {self.path} cannot {what}; it supports: "
                       f"{', '.join(self.supports) or 'nothing'}")

  # --------------------------------------------------------------------------- operations
  def embed(self, images: Images, *, maps: bool = False):
    """Pooled encoder features (N, D) float32, as the pretraining monitors compute them
    (the encoder in inference mode); with `maps=True`, also the last feature maps
    (N, h, w, C)."""
    self._require("embed")
    out = self._run("embed", self._embed_fn, list_inputs(images))
    feats = out["pooled"]
    return (feats, out["map"]) if maps else feats

  def predict(self, images: Images, *, probs: bool = False):
    """Classifier: probabilities (N, K) float32 (softmax or sigmoid, as the run's loss).

    Segmenter: masks (N, H, W) uint8 at each input's own resolution (a list of (H, W)
    masks when the inputs differ in size); with `probs=True`, `(masks, probabilities)`:
    the foreground probability (H, W) for a one-channel head, else (H, W, K).
    """
    self._require("predict")
    items = list_inputs(images)
    out = self._run("predict", self.stage.predict, items, keep_sizes=True)
    if "mask" not in out:
      return out["probs"].astype(np.float32)
    masks, maps = [], []
    for mask, prob, hw in zip(out["mask"], out["probs"], out["_hw"]):
      prob = prob.astype(np.float32)
      if tuple(hw) != mask.shape:  # back to the input size: resize probabilities, decide
        prob = _resize_probs(prob, tuple(hw))
        mask = ((prob > 0.5) if prob.ndim == 2 else np.argmax(prob, -1)).astype(np.uint8)
      masks.append(mask)
      maps.append(prob)
    masks, maps = _stack_if_same(masks), _stack_if_same(maps)
    return (masks, maps) if probs else masks

  def sample(self, num: int, *, seed: int = 0, num_steps: int | None = None,
             sampler: str | None = None) -> np.ndarray:
    """`num` generated images (N, H, W, C) in [0, 1]; the sampler and its number of steps
    default to the run's `config.sample`."""
    self._require("sample")
    if self.stage.mesh is None:
      self.stage.mesh = mesh_lib.make_mesh(self.config.mesh)
    sample_cfg = self.config.get("sample", {})
    return self.stage.sample(self.trained.run.extras, num=int(num), seed=int(seed),
                             num_steps=int(num_steps or sample_cfg.get("steps", 50)),
                             sampler=sampler or sample_cfg.get("sampler", "ddim"))

  # ----------------------------------------------------------------------------- internals
  @functools.cached_property
  def _encoder(self) -> nn.Module | None:
    if "encoder" not in self.trained.run.params:
      return None
    enc = getattr(self.stage.model, "encoder", None)  # setup()-made submodules: None
    if isinstance(enc, str):
      return unet.get_encoder(enc)
    return enc if isinstance(enc, nn.Module) else None

  def _embed_fn(self, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    feats = self._encoder.apply(variables, images, False)
    if not isinstance(feats, dict) or "pooled" not in feats:
      raise ValueError(f"the encoder of {self.path} does not return pooled features")
    return {"pooled": feats["pooled"].astype(np.float32),
            "map": unet.last_feature_map(feats).astype(np.float32)}

  @functools.cached_property
  def _transforms(self) -> list:
    return self.stage.transforms("test")

  def _compiled(self, which: str, fn):
    """(jitted fn, device variables) of one operation, made once."""
    if which not in self._cache:
      tree = self.trained.run.variables("encoder" if which == "embed" else None)
      self._cache[which] = (jax.jit(fn), jax.device_put(tree))
    return self._cache[which]

  def preprocess(self, image: np.ndarray | PathLike) -> np.ndarray:
    """One input through the run's host pipeline: (S, S, C) float32."""
    x = self.read(image)
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {x.shape}")
    if x.dtype == bool or (np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8):
      x = imageio._to_uint8(x)  # pylint: disable=protected-access
    elif np.issubdtype(x.dtype, np.floating):
      x = x.astype(np.float32)
    if x.shape[-1] in (2, 4):  # grey + alpha, RGBA: drop alpha
      x = x[..., :x.shape[-1] - 1]
    x = imageio.convert_channels(x, self.channels)
    return transforms_lib.apply_transforms({"image": x}, self._transforms)["image"]

  def _batches(self, items) -> Iterator[tuple[np.ndarray, int, list]]:
    for start in range(0, len(items), self.batch_size):
      chunk = [self.read(item) for _, item in items[start:start + self.batch_size]]
      xs = np.stack([self.preprocess(x) for x in chunk])
      n = len(xs)
      if n < self.batch_size:
        xs = np.concatenate([xs, np.zeros((self.batch_size - n, *xs.shape[1:]), xs.dtype)])
      yield xs, n, [x.shape[:2] for x in chunk]

  def read(self, item: np.ndarray | PathLike) -> np.ndarray:
    """An input as an array: files decoded at the run's channels, arrays as given."""
    if isinstance(item, (str, os.PathLike)):
      return _read(pathlib.Path(item), self.channels)
    return np.asarray(item)

  def _run(self, which: str, fn, items, keep_sizes: bool = False) -> dict[str, Any]:
    fn, variables = self._compiled(which, fn)
    outs: dict[str, list] = {}
    for xs, n, sizes in self._batches(items):
      got = jax.device_get(fn(variables, xs))
      for key, value in got.items():
        outs.setdefault(key, []).append(np.asarray(value)[:n])
      outs.setdefault("_hw", []).append(np.asarray(sizes, np.int64).reshape(n, 2))
    out = {k: np.concatenate(v) for k, v in outs.items()}
    if not keep_sizes:
      out.pop("_hw")
    return out


def _read(path: pathlib.Path, channels: int) -> np.ndarray:
  """An image file as (H, W, C) uint8 at `channels`, or a .npy array as stored."""
  if path.suffix.lower() == ".npy":
    return np.load(path)
  return imageio.decode_image(path, channels=channels)


def _resize_probs(prob: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of (h, w) or (h, w, K) float32 probabilities to `hw`."""
  if prob.ndim == 2:
    return imageio.resize_image(prob[..., None], hw)[..., 0]
  return imageio.resize_image(prob, hw)


def _stack_if_same(arrays: list[np.ndarray]):
  shapes = {a.shape for a in arrays}
  return np.stack(arrays) if len(shapes) == 1 else arrays
