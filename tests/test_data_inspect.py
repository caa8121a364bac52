"""The data inspector: the CLI on a tiny image+mask folder, and its report of skips and groups."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medrep_jax.data import inspect, registry
from medrep_jax.data.sources import DataError, Source, SourceInfo

REPO = pathlib.Path(__file__).resolve().parents[1]


def _folder(root, n=10, size=(12, 16)):
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, size + (3,)).astype(np.uint8)).save(
        root / "images" / f"c{i:02d}.png")
    mask = np.zeros(size, np.uint8)
    mask[2:6, 3:9] = 255
    Image.fromarray(mask).save(root / "masks" / f"c{i:02d}.png")
  return root


def _cli(*args, cwd):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "medrep_jax.data", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_on_an_image_mask_folder(tmp_path):
  root = _folder(tmp_path / "polyps")
  got = _cli("inspect", "--name", "image_mask_folder", "--root", str(root),
             "--set", "val_fraction=0.2", "--set", "test_fraction=0.2", cwd=tmp_path)
  assert got.returncode == 0, got.stderr
  out = got.stdout
  assert re.search(r"^train +6 +6 +0 +(-|\d+)$", out, re.M), out
  assert re.search(r"^val +2 +2 +0 +(-|\d+)$", out, re.M)
  assert "[train] 6 items (6 image/mask pairs)" in out
  assert re.search(r"size 12x16 \(6\); channels [13] \(6\); dtype uint8 \(6\); values \[", out)
  assert "masks (sample): values {0, 1}; foreground 12.5% of pixels" in out
  sheet = tmp_path / "inspect_image_mask_folder.png"
  assert "contact sheet: inspect_image_mask_folder.png" in out and sheet.is_file()
  assert Image.open(sheet).size[0] > 0


def test_cli_errors_are_one_paragraph(tmp_path):
  got = _cli("inspect", "--name", "image_mask_folder", "--root", str(tmp_path / "nope"),
             cwd=tmp_path)
  assert got.returncode == 2
  assert "data error: data root folder" in got.stderr and "Traceback" not in got.stderr
  assert str(tmp_path / "nope") in got.stderr


class _Fake(Source):
  """A source with the attributes the pairing helper adds: skipped and groups."""

  def __init__(self, split):
    self.n = {"train": 6, "val": 2, "test": 2}[split]
    self.groups = [f"p{(i + (split == 'val')) // 2}" for i in range(self.n)]
    self.skipped = [(f"x/{k}.png", "no mask") for k in range(7)] if split == "train" else []
    self.labels = np.arange(self.n, dtype=np.int32) % 2
    self.info = SourceInfo(name="fake", num_classes=2, class_names=("a", "b"), channels=1,
                           has_mask=True, num_mask_classes=2, image_dtype="float32")

  def _num_elements(self):
    return self.n

  def _load(self, i):
    image = np.full((4, 5, 1), -1000.0 + i, np.float32)
    return {"image": image, "mask": (np.arange(20).reshape(4, 5) < 5).astype(np.uint8),
            "label": np.int32(i % 2)}


def test_report_lists_skips_counts_and_leaking_groups(tmp_path, monkeypatch):
  monkeypatch.setattr(registry, "get_source", lambda cfg, split: _Fake(split))
  lines = []
  got = inspect.inspect_data(registry.data_config("phantoms"), output=tmp_path / "s.png",
                             echo=lines.append)
  text = "\n".join(lines)
  assert re.search(r"^train +6 +6 +7 +3$", text, re.M), text
  assert "    x/0.png: no mask" in text and "    ... and 2 more" in text
  assert "x/5.png" not in text
  assert "classes: a 3, b 3" in text and "values [-1000, -995]" in text
  assert "dtype float32 (6)" in text
  assert "WARNING: 2 group(s) are in more than one split: p0 (train, val, test), p1 (train, val)" in text
  assert got["sheet"] == str(tmp_path / "s.png") and (tmp_path / "s.png").is_file()


def test_a_split_that_cannot_be_built_is_reported(monkeypatch):
  def source(cfg, split):
    if split == "test":
      raise DataError("no test folder")
    return _Fake(split)
  monkeypatch.setattr(registry, "get_source", source)
  lines = []
  got = inspect.inspect_data(registry.data_config("phantoms"), output=None, echo=lines.append)
  assert "[test] not available: no test folder" in lines and got["errors"] == {
      "test": "no test folder"}
  monkeypatch.setattr(registry, "get_source", lambda cfg, split: (_ for _ in ()).throw(
      DataError(f"bad {split}")))
  with pytest.raises(DataError, match="bad train"):
    inspect.inspect_data(registry.data_config("phantoms"), output=None, echo=lines.append)
