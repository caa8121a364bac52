"""The Colab notebook runs headlessly, end to end, on the tiny config."""
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "colabs" / "quickstart.ipynb"


def _texts(cell) -> str:
  """A code cell's printed text and its markdown/plain-text displays."""
  out = []
  for o in cell.get("outputs", []):
    out.append(o.get("text", ""))
    data = o.get("data", {})
    out += [data.get("text/markdown", ""), data.get("text/plain", "")]
  return "".join(out)


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDREP_NOTEBOOK_SIZE", "tiny")
  monkeypatch.setenv("MEDREP_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  outputs = "".join(_texts(c) for c in code)
  assert not _texts(code[0]), "the Colab install cell must do nothing outside Colab"
  assert "segment" in outputs and "eval/dice" in outputs
  assert (tmp_path / "run" / "segment" / "report.md").exists()
  assert os.listdir(tmp_path / "run" / "segment" / "figures")
  # The reports render with their figures: images shown, no relative figure links left.
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
  assert images >= 4, images
  assert not re.search(r"!\[[^\]]*\]\([^)]*\.png\)", outputs), "a figure left as a link"
  # It ends by using the trained models: embeddings and predicted masks.
  assert "embeddings: (" in outputs and "masks: (" in outputs


def _install_cell() -> str:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return next(c for c in nb.cells if c.cell_type == "code").source


def _run_install_cell(monkeypatch, *, colab: bool, gpu_driver: str = "", tpu: bool = False):
  """Runs the install cell as Colab would (or not), with pip, git and nvidia-smi faked.

  Returns the pip commands it ran.
  """
  import glob
  import importlib.metadata
  import shutil
  import subprocess
  import sys
  import types
  pips = []

  def fake_run(cmd, **kwargs):
    if "pip" in cmd:
      pips.append(cmd)
    out = f"{gpu_driver}\n" if "--query-gpu=driver_version" in cmd else ""
    return subprocess.CompletedProcess(cmd, 0 if gpu_driver else 9, stdout=out, stderr="")

  real_version = importlib.metadata.version

  def version(name):
    if name == "medrep_jax":  # as on a fresh runtime
      raise importlib.metadata.PackageNotFoundError(name)
    return real_version(name)

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu_driver
                      else None)
  monkeypatch.setattr(glob, "glob", lambda pattern: [])
  monkeypatch.setattr(importlib.metadata, "version", version)
  monkeypatch.setattr(sys, "path", list(sys.path))
  for key in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
    monkeypatch.delenv(key, raising=False)
  if tpu:
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  source = _install_cell().replace('REPO_DIR = "/content/medrep_jax"',
                                   f"REPO_DIR = {str(REPO_ROOT)!r}")
  exec(compile(source, "install_cell", "exec"), {})  # pylint: disable=exec-used
  return pips


@pytest.mark.parametrize("runtime,extra", [("cpu", ""), ("gpu 550.54.15", "[cuda]"),
                                           ("gpu 580.65.06", "[cuda13]"), ("tpu", "[tpu]")])
def test_install_cell_installs_the_runtime_build_in_colab(monkeypatch, runtime, extra):
  driver = runtime.split()[1] if runtime.startswith("gpu") else ""
  pips = _run_install_cell(monkeypatch, colab=True, gpu_driver=driver,
                           tpu=runtime == "tpu")
  assert [cmd[-1] for cmd in pips] == [f"{REPO_ROOT}{extra}"]
  assert pips[0][-3:-1] == ["-q", "-e"]


def test_install_cell_does_nothing_outside_colab(monkeypatch):
  """A headless run (tests/test_colab.py, Jupyter) never pip installs."""
  assert _run_install_cell(monkeypatch, colab=False, gpu_driver="550.54.15") == []


def test_report_parts_cuts_out_existing_figures(tmp_path):
  """What the notebook shows of report.md: text, then each figure by absolute path."""
  from medrep_jax.train.report import report_parts
  (tmp_path / "seg" / "figures").mkdir(parents=True)
  figure = tmp_path / "seg" / "figures" / "overlay.png"
  figure.write_bytes(b"png")
  report = tmp_path / "report.md"
  report.write_text("# Report\n\n![overlay](seg/figures/overlay.png)\n\n"
                    "![gone](figures/missing.png) and ![web](https://x.org/a.png)\n")
  parts = report_parts(report)
  assert parts[0].startswith("# Report") and parts[1] == figure.resolve()
  assert "![gone](figures/missing.png)" in parts[2] and "https://x.org/a.png" in parts[2]
  assert len(parts) == 3
