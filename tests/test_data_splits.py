"""splits.py / tables.py: groups, carving (same as the old functions), k-fold, split files, labels."""
import json

import numpy as np
import pytest

from medrep_jax.data import splits
from medrep_jax.data.sources import DataError

FRACTIONS = dict(val_fraction=0.2, test_fraction=0.1)


def _paths(n_patients=12, per=(1, 2, 3, 4)):
  """Relative paths `p00/left_0.png` ... with a varying number of images per patient."""
  out = []
  for p in range(n_patients):
    for k in range(per[p % len(per)]):
      out.append(f"p{p:02d}/{'left' if k % 2 else 'right'}_{k}.png")
  return sorted(out)


# ---------------------------------------------------------------- group_of


def test_group_of():
  assert splits.group_of("p07/img/scan_3.png", r"^([^/]+)/") == "p07"
  assert splits.group_of("a\\p01_img_003.npy", r"(p\d+)_") == "p01"
  assert splits.group_of("eyes/anna_left.jpg", r"[a-z]+(?=_(?:left|right))") == "anna"
  assert splits.group_of("x/vid12_f0003.png", r"vid\d+") == "vid12"
  assert splits.group_of("loose.png", r"(p\d+)_", unmatched="own") == "loose.png"
  with pytest.raises(DataError, match=r"'loose\.png' does not match data\.group_by = '\(p\\\\d\+\)_'"):
    splits.group_of("loose.png", r"(p\d+)_")
  with pytest.raises(DataError, match=r"data\.group_by = '\(p' is not a valid regular"):
    splits.group_of("x", "(p")


# ---------------------------------------------------------------- carve
# The splits of earlier releases (their `sources.carve_split` / `carve_by_group`, seed 0,
# val 0.2, test 0.1), recorded from them: runs started before keep their splits.
_EARLIER = {("none", "val"): [2, 10, 11, 20, 21], ("none", "test"): [4, 18],
            ("labels", "val"): [1, 8, 9, 22], ("labels", "test"): [12, 16, 20],
            ("group", "val"): [2, 8, 14, 20], ("group", "test"): [3, 9, 15, 21]}


def test_carve_reproduces_the_earlier_splits():
  ids = [f"img_{i:03d}.png" for i in range(23)]
  labels = [i % 3 if i % 7 else 1 for i in range(23)]
  groups = [f"p{i % 6}" for i in range(23)]
  kinds = {"none": {}, "labels": {"strata": labels}, "group": {"groups": groups}}
  for kind, extra in kinds.items():
    parts = {s: splits.carve(ids, s, seed=0, **extra, **FRACTIONS)
             for s in ("train", "val", "test")}
    assert parts["val"] == _EARLIER[(kind, "val")]
    assert parts["test"] == _EARLIER[(kind, "test")]
    assert sorted(sum(parts.values(), [])) == list(range(23))
    assert splits.carve(ids, "all", seed=0, **extra, **FRACTIONS) == list(range(23))


@pytest.mark.parametrize("seed", [0, 5])
def test_carve_with_groups_keeps_groups_whole(seed):
  ids = _paths()
  groups = [splits.group_of(p, r"^(p\d+)/") for p in ids]
  parts = {s: splits.carve(ids, s, groups=groups, seed=seed, **FRACTIONS)
           for s in ("train", "val", "test")}
  assert sorted(sum(parts.values(), [])) == list(range(len(ids)))
  owner = {}
  for split, idx in parts.items():
    for i in idx:
      assert owner.setdefault(groups[i], split) == split, f"group {groups[i]} in two splits"
  assert all(parts.values())


def test_carve_groups_with_strata_keeps_groups_whole_and_balances():
  ids = _paths(40)
  groups = [p.split("/")[0] for p in ids]
  labels = [int(g[1:]) % 2 for g in groups]
  parts = {s: splits.carve(ids, s, groups=groups, strata=labels, seed=1, val_fraction=0.25,
                           test_fraction=0.25) for s in ("train", "val", "test")}
  assert sorted(sum(parts.values(), [])) == list(range(len(ids)))
  for s, idx in parts.items():
    assert {labels[i] for i in idx} == {0, 1}, s  # both classes in every split
    others = {groups[i] for t, o in parts.items() if t != s for i in o}
    assert not {groups[i] for i in idx} & others


def test_carve_errors():
  with pytest.raises(DataError, match="groups has 2 entries for 3 ids"):
    splits.carve(["a", "b", "c"], "train", groups=["x", "y"], seed=0, **FRACTIONS)
  with pytest.raises(DataError, match="unknown split"):
    splits.carve(["a"], "training", seed=0, **FRACTIONS)


# ---------------------------------------------------------------- k-fold


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kfold_covers_every_item_once_and_keeps_groups(k):
  ids = _paths(13)
  groups = [p.split("/")[0] for p in ids]
  seen = []
  for fold in range(k):
    train, val = splits.kfold(ids, groups=groups, k=k, fold=fold, seed=2)
    assert sorted(train + val) == list(range(len(ids)))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    seen += val
  assert sorted(seen) == list(range(len(ids)))
  sizes = [len(splits.kfold(ids, groups=groups, k=k, fold=f, seed=2)[1]) for f in range(k)]
  assert max(sizes) - min(sizes) <= 4  # balanced by items (largest group has 4)
  train, val = splits.kfold(ids, k=k, fold=0, seed=2)  # no groups: per item
  assert abs(len(val) - len(ids) / k) <= 1


def test_kfold_errors():
  with pytest.raises(DataError, match=r"k=3 needs at least 3 groups"):
    splits.kfold(["a", "b", "c"], groups=["x", "x", "y"], k=3, fold=0, seed=0)
  with pytest.raises(DataError, match=r"fold 4 is outside \[0, 4\)"):
    splits.kfold(["a"] * 8, k=4, fold=4, seed=0)


# ---------------------------------------------------------------- split files


def test_split_file_csv_json_txt(tmp_path):
  (tmp_path / "s.csv").write_text("Image,Set\na/1.png,training\na/2.png, Validation\n"
                                  "b/3.png,TEST\n")
  want = {"a/1.png": "train", "a/2.png": "val", "b/3.png": "test"}
  assert splits.read_split_file(tmp_path / "s.csv") == want
  (tmp_path / "s.json").write_text(json.dumps({"train": ["a/1.png"], "valid": ["a/2.png"],
                                               "testing": ["b/3.png"]}))
  assert splits.read_split_file(tmp_path / "s.json") == want
  (tmp_path / "t.json").write_text(json.dumps({"a/1.png": "train", "b/3.png": "test"}))
  assert splits.read_split_file(tmp_path / "t.json") == {"a/1.png": "train", "b/3.png": "test"}
  d = tmp_path / "lists"
  d.mkdir()
  (d / "train.txt").write_text("a/1.png\n./a/2.png\n\n")
  (d / "test.txt").write_text("b/3.png\n")
  assert splits.read_split_file(d) == {"a/1.png": "train", "a/2.png": "train",
                                       "b/3.png": "test"}
  assert splits.read_split_file(d / "test.txt") == {"b/3.png": "test"}


def test_split_file_errors(tmp_path):
  (tmp_path / "s.csv").write_text("file,group\na.png,train\n")
  with pytest.raises(DataError, match=r"s\.csv: no split column found among \['file', 'group'\]"):
    splits.read_split_file(tmp_path / "s.csv")
  (tmp_path / "u.csv").write_text("id,split\na.png,holdout\n")
  with pytest.raises(DataError, match=r"unknown split name 'holdout' in .*u\.csv"):
    splits.read_split_file(tmp_path / "u.csv")
  (tmp_path / "d.json").write_text(json.dumps({"train": ["a"], "test": ["a"]}))
  with pytest.raises(DataError, match=r"d\.json: id 'a' is listed in two splits"):
    splits.read_split_file(tmp_path / "d.json")


# ---------------------------------------------------------------- label tables


def test_single_label_names_and_ints(tmp_path):
  (tmp_path / "l.csv").write_text("image;diagnosis\nx/a.png;mel\nb;nevus\nc.jpg;mel\n")
  t = splits.read_label_csv(tmp_path / "l.csv", id_column="image")
  assert t.class_names == ("mel", "nevus") and not t.multi_label
  np.testing.assert_array_equal(t.labels, [0, 1, 0])
  assert t.labels.dtype == np.int32
  kept, labels, unused = t.match(["x/a.png", "y/b.png", "c.jpg", "d.png"])
  assert kept == [0, 1, 2] and labels.tolist() == [0, 1, 0] and unused == []
  assert t.lookup("other/c.jpg") == 0 and t.lookup("z.png") is None
  t = splits.read_label_csv(tmp_path / "l.csv", id_column="image",
                            class_names=("nevus", "mel"))
  np.testing.assert_array_equal(t.labels, [1, 0, 1])
  (tmp_path / "g.csv").write_text("id,grade,age\n1,0,50\n2,3,60\n")
  t = splits.read_label_csv(tmp_path / "g.csv", id_column="id", label_columns=["grade"])
  np.testing.assert_array_equal(t.labels, [0, 3])
  assert t.class_names == ("0", "1", "2", "3")


def test_multi_label_and_id_rule(tmp_path):
  (tmp_path / "m.csv").write_text("path,effusion,nodule\ncase1/img.png,1,0\n"
                                  "case2/img,0,1\nz.nii.gz,1,1\n")
  t = splits.read_label_csv(tmp_path / "m.csv", id_column="path")
  assert t.multi_label and t.class_names == ("effusion", "nodule")
  assert t.labels.dtype == np.float32
  # exact relative path, path without suffix, stem ('.nii.gz' is one suffix)
  kept, labels, unused = t.match(["case1/img.png", "case2/img.jpg", "vol/z.nii.gz",
                                  "case3/img.png"])
  assert kept == [0, 1, 2] and unused == []
  np.testing.assert_array_equal(labels, [[1, 0], [0, 1], [1, 1]])


def test_label_table_errors(tmp_path):
  (tmp_path / "m.csv").write_text("path,effusion,nodule\na,1,0\nb,0,2\n")
  with pytest.raises(DataError, match=r"m\.csv has no label column\(s\) \['mass'\].*"
                     r"\['path', 'effusion', 'nodule'\]"):
    splits.read_label_csv(tmp_path / "m.csv", id_column="path", label_columns=["mass"])
  with pytest.raises(DataError, match=r"m\.csv has no id column 'file'.*\['path', 'effusion'"):
    splits.read_label_csv(tmp_path / "m.csv", id_column="file")
  with pytest.raises(DataError, match=r"m\.csv row 3, column 'nodule': '2' is not 0 or 1"):
    splits.read_label_csv(tmp_path / "m.csv", id_column="path")
  (tmp_path / "d.csv").write_text("id,y\na,1\na,0\n")
  with pytest.raises(DataError, match=r"d\.csv: id 'a' appears twice \(rows 2 and 3\)"):
    splits.read_label_csv(tmp_path / "d.csv", id_column="id")
  (tmp_path / "n.csv").write_text("id,y\na,cat\n")
  with pytest.raises(DataError, match=r"labels \['cat'\] not in data\.class_names"):
    splits.read_label_csv(tmp_path / "n.csv", id_column="id", class_names=("dog",))
