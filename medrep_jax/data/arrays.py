"""In-memory sources and writers: cached latents, generated images as a dataset."""
from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np

from medrep_jax.data import imageio
from medrep_jax.data.sources import DataError, SourceInfo


class ArraySource:
  """Random access over equal-length arrays, e.g. cached VAE latents.

  `source[i]` is `{name: array[i] for each array} | {"index": i}`.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], info: SourceInfo):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise DataError(f"ArraySource arrays differ in length: {lengths}")
    self.arrays = dict(arrays)
    self.info = info
    self._n = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    rec = {k: v[i] for k, v in self.arrays.items()}
    rec["index"] = np.int64(i)
    return rec

  def save(self, path: str | pathlib.Path) -> None:
    np.savez(path, **self.arrays)

  @classmethod
  def load(cls, path: str | pathlib.Path, info: SourceInfo) -> "ArraySource":
    path = pathlib.Path(path)
    if not path.exists():
      raise DataError(f"cached arrays {path} not found")
    from medrep_jax.data.readers import npz_array  # pylint: disable=g-import-not-at-top
    with np.load(path) as f:
      return cls({k: npz_array(f, path, k) for k in f.files}, info)


def write_image_folder(images: np.ndarray, root: str | pathlib.Path, *,
                       class_name: str = "synthetic", start: int = 0) -> list[pathlib.Path]:
  """Writes float images in [0, 1] (N, H, W, C) as PNGs under `root/<class_name>/`.

  The result is an `image_folder` dataset (`data.name=image_folder, data.root=root`).
  """
  folder = pathlib.Path(root) / class_name
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for k, img in enumerate(np.asarray(images)):
    u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    path = folder / f"{start + k:06d}.png"
    path.write_bytes(imageio.encode_png(u8))
    paths.append(path)
  return paths
