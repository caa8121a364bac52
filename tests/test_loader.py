"""grain loaders: determinism, per-process blocks, resume, eval padding."""
import numpy as np
import pytest

from medrep_jax.data import loader, subsets
from medrep_jax.data.phantoms import Phantoms
from medrep_jax.data.registry import data_config
from medrep_jax.data.transforms import build_transforms


@pytest.fixture(scope="module")
def source():
  return Phantoms("train", num_examples=40, image_size=16)


def tfs():
  return build_transforms(data_config("phantoms", image_size=16))


def test_processes_together_see_the_single_process_batch(source):
  one = loader.train_dataset(source, tfs(), global_batch=8, seed=3, process_index=0,
                             process_count=1)
  parts = [loader.train_dataset(source, tfs(), global_batch=8, seed=3,
                                process_index=p, process_count=4) for p in range(4)]
  for step in (0, 4, 9):  # 9 crosses into the second and third epoch
    whole = one[step]
    joined = {k: np.concatenate([p[step][k] for p in parts]) for k in whole}
    for k in whole:
      np.testing.assert_array_equal(whole[k], joined[k])


def test_epochs_are_permutations_and_reshuffled(source):
  ds = loader.train_dataset(source, tfs(), global_batch=8, seed=0, process_index=0,
                            process_count=1)
  epoch0 = np.concatenate([ds[i]["index"] for i in range(5)])
  epoch1 = np.concatenate([ds[i]["index"] for i in range(5, 10)])
  assert sorted(epoch0) == list(range(40)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  other = loader.train_dataset(source, tfs(), global_batch=8, seed=1, process_index=0,
                               process_count=1)
  assert not np.array_equal(ds[0]["index"], other[0]["index"])


def test_iterator_state_resumes_at_the_next_batch(source):
  ds = loader.train_dataset(source, tfs(), global_batch=8, seed=0, process_index=0,
                            process_count=1)
  it = loader.iterate(ds, num_threads=2)
  seen = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = next(it)
  resumed = loader.iterate(ds, num_threads=2, state=state)
  got = next(resumed)
  for k in expected:
    np.testing.assert_array_equal(expected[k], got[k])
  np.testing.assert_array_equal(seen[1]["image"], ds[1]["image"])


def test_batch_larger_than_split_is_an_error(source):
  with pytest.raises(ValueError, match="fewer than the global batch"):
    loader.train_dataset(source, tfs(), global_batch=64, seed=0)


def test_eval_batches_cover_the_split_once_with_padding(source):
  batches = list(loader.eval_batches(source, tfs(), global_batch=16, process_index=0,
                                     process_count=1))
  assert len(batches) == 3  # 40 examples -> 16 + 16 + 8 (+8 padding)
  valid = np.concatenate([b["_valid"] for b in batches])
  idx = np.concatenate([b["index"] for b in batches])[valid > 0]
  assert valid.sum() == 40 and sorted(idx) == list(range(40))
  capped = list(loader.eval_batches(source, tfs(), global_batch=16, max_examples=20,
                                    process_index=0, process_count=1))
  assert sum(b["_valid"].sum() for b in capped) == 20
  # The cap is a fixed spread-out subset, not the first rows (which may be one class).
  cidx = np.concatenate([b["index"] for b in capped])[np.concatenate(
      [b["_valid"] for b in capped]) > 0]
  assert len(set(cidx)) == 20 and max(cidx) >= 20
  again = list(loader.eval_batches(source, tfs(), global_batch=16, max_examples=20,
                                   process_index=0, process_count=1))
  np.testing.assert_array_equal(cidx, np.concatenate([b["index"] for b in again])[
      np.concatenate([b["_valid"] for b in again]) > 0])


def test_label_fraction_is_stratified_and_deterministic(source):
  sub = subsets.label_fraction(source, 0.25, seed=0)
  again = subsets.label_fraction(source, 0.25, seed=0)
  np.testing.assert_array_equal(sub.indices, again.indices)
  labels = source.labels[sub.indices]
  assert len(sub) == 10 and set(labels) == {0, 1, 2}
  with pytest.raises(ValueError, match="label fraction"):
    subsets.label_fraction(source, 0.0, seed=0)
