"""launch.seed_compare: mean ± std over seeds and the paired t-interval, from done.json files."""
import json

import numpy as np
import pytest

from launch import seed_compare

T_975_2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom


def _runs(tmp_path, values):
  for variant, per_seed in values.items():
    for seed, dice in enumerate(per_seed):
      d = tmp_path / f"s{seed}" / variant
      d.mkdir(parents=True)
      (d / "done.json").write_text(json.dumps({"eval/dice": dice, "step": 10}))


def test_table_and_paired_interval_match_numpy(tmp_path):
  a, b = [0.90, 0.93, 0.95], [0.88, 0.92, 0.91]
  _runs(tmp_path, {"drfl": a, "ss": b})
  text = seed_compare.main([str(tmp_path / "s{seed}" / "{variant}"), "--seeds", "0", "1",
                            "2", "--variants", "ss", "drfl", "--pairs", "drfl-ss",
                            "--scale", "100", "--out", str(tmp_path / "t.md")])
  assert f"| drfl | {100 * np.mean(a):.2f} ± {100 * np.std(a, ddof=1):.2f} (n=3) |" in text
  d = np.subtract(a, b)
  half = T_975_2 * d.std(ddof=1) / np.sqrt(3)
  mean, lo, hi, n = seed_compare.paired_interval(a, b)
  assert n == 3 and mean == pytest.approx(d.mean())
  assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half))
  assert f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" in text
  assert (tmp_path / "t.md").read_text() == text


def test_missing_runs_are_left_out_and_bad_pairs_named(tmp_path, capsys):
  _runs(tmp_path, {"drfl": [0.9, 0.8], "ss": [0.7]})
  table = seed_compare.collect(str(tmp_path / "s{seed}" / "{variant}"), [0, 1, 2],
                               ["drfl", "ss"], ["eval/dice"])
  assert sorted(table["drfl"]) == [0, 1] and sorted(table["ss"]) == [0]
  assert seed_compare.paired_interval([0.9], [0.7])[3] == 1
  with pytest.raises(SystemExit):
    seed_compare.main([str(tmp_path / "{variant}"), "--seeds", "0", "--variants", "ss",
                       "--pairs", "drfl-ss"])
  assert "drfl-ss" in capsys.readouterr().err
