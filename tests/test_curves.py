"""launch.curves: values at steps, the table, the figure, and bad arguments."""
import json

import pytest

from launch import curves


def _run(path, rows):
  path.mkdir()
  (path / "metrics.jsonl").write_text(
      "\n".join(json.dumps({"split": "train", **r}) for r in rows) + "\n")
  return str(path)


def test_curves_table_and_figure(tmp_path):
  a = _run(tmp_path / "a", [{"step": 10, "loss/nce": 6.9}, {"step": 20, "loss/nce": 6.0}])
  b = _run(tmp_path / "b", [{"step": 10, "loss/nce": 6.95, "x": 1.0}])
  got = curves.load_curves([a, b], ["loss/nce", "x"])
  assert got["loss/nce"][a] == ([10, 20], [6.9, 6.0]) and a not in got["x"]
  assert curves.value_at(got["loss/nce"][a], 15) == 6.9
  assert curves.value_at(got["loss/nce"][a], 5) is None
  assert curves.value_at(got["loss/nce"][a], 30) is None  # past the run's end
  out = tmp_path / "c.png"
  curves.main([a, b, "--labels", "A", "B", "--metrics", "loss/nce", "--chance",
               "loss/nce=6.93", "--out", str(out), "--table", str(tmp_path / "t.md"),
               "--at", "10", "20"])
  assert out.stat().st_size > 0
  text = (tmp_path / "t.md").read_text()
  assert "| A | loss/nce | 6.900 | 6.000 |" in text and "| B | loss/nce | 6.950 | - |" in text
  with pytest.raises(SystemExit, match="--labels"):
    curves.main([a, b, "--labels", "A"])
  with pytest.raises(SystemExit, match="METRIC=VALUE"):
    curves.main([a, "--metrics", "loss/nce", "--chance", "loss/cs=1"])
