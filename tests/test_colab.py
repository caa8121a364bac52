"""The Colab notebook runs headlessly, end to end, on the tiny config."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDREP_NOTEBOOK_SIZE", "tiny")
  monkeypatch.setenv("MEDREP_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  nb = nbformat.read(REPO_ROOT / "colabs" / "quickstart.ipynb", as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "segment" in outputs and "eval/dice" in outputs
  assert (tmp_path / "run" / "segment" / "report.md").exists()
  assert os.listdir(tmp_path / "run" / "segment" / "figures")
