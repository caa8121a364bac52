"""Runs a trained model on a folder (or file) of images and writes its predictions.

    python -m medrep_jax.predict --workdir runs/ft_seg --input scans/ --output preds/

What is written depends on the run (`medrep_jax.load(workdir).supports`):
  - segmenters: `<stem>_mask.png` (class ids; a binary mask is 0/255) and
    `<stem>_overlay.png` (the mask over the image), at each image's own resolution;
  - classifiers: `predictions.csv` (file, predicted class, one probability per class);
  - encoders (pretraining runs): `embeddings.npy` (N, D) and `files.txt` (one file name
    a row, in the order of the embeddings).
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys
from typing import Sequence

import numpy as np

from medrep_jax import errors

CHUNK = 256  # images read, predicted and written per step (bounded memory)


def predict_folder(workdir: str | os.PathLike, inputs: str | os.PathLike,
                   output: str | os.PathLike, *, batch_size: int = 32,
                   progress: bool = True) -> dict[str, str]:
  """Writes predictions for `inputs` (a folder or a file) into `output`.

  Returns:
    {"kind": "segmentation" | "classification" | "embedding", "output": folder}.

  Raises:
    FileNotFoundError: no run in `workdir`, or no images in `inputs`.
    ValueError: the run can neither predict nor embed.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  from medrep_jax import inference  # pylint: disable=g-import-not-at-top
  model = inference.load(workdir, batch_size=batch_size)
  if not {"predict", "embed"} & set(model.supports):
    raise ValueError(f"the {model.name} run in {model.path} can neither predict nor embed "
                     f"(it supports: {', '.join(model.supports) or 'nothing'}); "
                     f"point --workdir at a classifier, segmenter or encoder run")
  items = inference.list_inputs(inputs)
  out = pathlib.Path(output).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  writer = _writer(model, out)
  bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress,
             file=sys.stdout)
  for start in range(0, len(items), CHUNK):
    chunk = items[start:start + CHUNK]
    writer.add(chunk)
    bar.update(len(chunk))
  bar.close()
  writer.close()
  return {"kind": writer.kind, "output": str(out)}


def _writer(model, out: pathlib.Path):
  if model.task == "classification":
    return _Classes(model, out)
  if model.task == "segmentation":
    return _Masks(model, out)
  return _Embeddings(model, out)


def _inputs(items) -> list:
  return [item for _, item in items]


def _file_name(name: str, item) -> str:
  return item.name if isinstance(item, pathlib.Path) else name


class _Masks:
  kind = "segmentation"

  def __init__(self, model, out: pathlib.Path):
    self.model, self.out = model, out

  def add(self, items) -> None:
    from medrep_jax.data import imageio  # pylint: disable=g-import-not-at-top
    from medrep_jax.eval import figures  # pylint: disable=g-import-not-at-top
    masks = self.model.predict(_inputs(items))
    for (stem, item), mask in zip(items, masks):
      image = self.model.read(item)
      scaled = mask * np.uint8(255) if len(self.model.classes) <= 2 else mask
      (self.out / f"{stem}_mask.png").write_bytes(imageio.encode_png(scaled))
      overlay = figures.overlay_mask(image.astype(np.float32), mask)
      rgb = np.clip(np.round(overlay * 255), 0, 255).astype(np.uint8)
      (self.out / f"{stem}_overlay.png").write_bytes(imageio.encode_png(rgb))

  def close(self) -> None:
    pass


class _Classes:
  kind = "classification"

  def __init__(self, model, out: pathlib.Path):
    self.model = model
    self.path = out / "predictions.csv"
    self.file = self.path.open("w", newline="")
    self.csv = csv.writer(self.file)
    self.csv.writerow(["file", "predicted", *model.classes])

  def add(self, items) -> None:
    probs = self.model.predict(_inputs(items))
    for (name, item), p in zip(items, probs):
      self.csv.writerow([_file_name(name, item), self.model.classes[int(np.argmax(p))],
                         *(f"{float(v):.6f}" for v in p)])

  def close(self) -> None:
    self.file.close()


class _Embeddings:
  kind = "embedding"

  def __init__(self, model, out: pathlib.Path):
    self.model, self.out = model, out
    self.feats, self.names = [], []

  def add(self, items) -> None:
    self.feats.append(self.model.embed(_inputs(items)))
    self.names += [_file_name(name, item) for name, item in items]

  def close(self) -> None:
    np.save(self.out / "embeddings.npy", np.concatenate(self.feats))
    (self.out / "files.txt").write_text("\n".join(self.names) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medrep_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished (or checkpointed) run")
  parser.add_argument("--input", required=True, help="an image folder or one image file")
  parser.add_argument("--output", required=True, help="the folder to write into")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  errors.add_debug_flag(parser)
  errors.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  got = predict_folder(args.workdir, args.input, args.output, batch_size=args.batch_size,
                       progress=not args.no_progress)
  print(f"Wrote {got['kind']} predictions to {got['output']}")
  return 0


def run() -> None:
  errors.command(main)  # one-paragraph errors (exit 2), SIGTERM message (exit 143)


if __name__ == "__main__":
  run()
