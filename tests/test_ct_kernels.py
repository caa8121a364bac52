"""Simulated CT reconstruction-kernel pairs: radon/FBP against analytic values, Poisson
noise, `simulate_pair`, and `KernelPairSource` (cache, splits, real pairs, errors)."""
import os
import pickle

import numpy as np
import pydicom
import pydicom.data
import pytest

from medrep_jax.data import ct_kernels as ck
from medrep_jax.data import kernel_pairs
from medrep_jax.data.kernel_pairs import KernelPairSource, Simulation
from medrep_jax.data.sources import DataError

N = 64


def _coords(n=N):
  c = (n - 1) / 2
  return np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="xy")  # x, y


def _disk(r, n=N, ss=8):
  """A centred disk of radius r pixels, anti-aliased (pixel coverage by supersampling)."""
  x = (np.arange(n * ss) + 0.5) / ss - 0.5 - (n - 1) / 2
  inside = x[:, None] ** 2 + x[None, :] ** 2 <= r * r
  return inside.reshape(n, ss, n, ss).mean((1, 3)).astype(np.float32)


def _phantom(n=N):
  """A smooth Shepp-Logan-like sum of ellipses (soft edges, so FBP can be exact)."""
  x, y = _coords(n)
  x, y = x / (n / 2), y / (n / 2)
  out = np.zeros((n, n), np.float32)
  for value, cx, cy, a, b, angle in ((1.0, 0, 0, .69, .92, 0), (-.8, 0, -.02, .62, .87, 0),
                                     (-.2, .22, 0, .11, .31, -18), (-.2, -.22, 0, .16, .41, 18),
                                     (.1, 0, .35, .21, .25, 0), (.1, 0, -.6, .05, .05, 0)):
    t = np.deg2rad(angle)
    u = ((x - cx) * np.cos(t) + (y - cy) * np.sin(t)) / a
    v = (-(x - cx) * np.sin(t) + (y - cy) * np.cos(t)) / b
    out += value / (1 + np.exp((np.sqrt(u ** 2 + v ** 2) - 1) * 12))
  return out


def test_radon_of_a_centred_disk_gives_chord_lengths():
  r = 20
  sino = ck.radon(_disk(r), ck.default_angles(12))
  t = np.arange(N) - (N - 1) / 2
  chord = 2 * np.sqrt(np.maximum(r * r - t * t, 0))
  assert sino.shape == (12, N) and sino.dtype == np.float32
  core = np.abs(t) < 0.8 * r
  np.testing.assert_allclose(sino[:, core], np.broadcast_to(chord[core], (12, core.sum())),
                             rtol=0.015)
  assert np.abs(sino[:, np.abs(t) > r + 2]).max() < 1e-6


def test_ramp_fbp_returns_the_phantom_inside_the_circle():
  phantom = _phantom()
  angles = ck.default_angles(100)
  recon = ck.fbp(ck.radon(phantom, angles), angles, "ramp")
  x, y = _coords()
  inner = x ** 2 + y ** 2 <= (0.9 * N / 2) ** 2
  err = np.abs(recon - phantom)[inner]
  assert err.mean() < 0.01 and err.max() < 0.06, (err.mean(), err.max())
  assert np.all(recon[~ck.circle_mask(N)] == 0)


def test_hann_with_half_cutoff_is_smoother_than_ramp():
  hu = np.where(_disk(26) > 0.5, 40.0, -1000.0)
  a, b = ck.simulate_pair(hu, num_views=90, i0=2e4, rng=0)  # A: Hann 0.5, B: ramp
  x, y = _coords()
  flat = x ** 2 + y ** 2 <= 12 ** 2
  assert a[flat].std() < 0.5 * b[flat].std()
  power = [np.abs(np.fft.fft2(np.where(flat, im - im[flat].mean(), 0))) ** 2 for im in (a, b)]
  fx = np.abs(np.fft.fftfreq(N))
  high = np.maximum(fx[:, None], fx[None, :]) > 0.25
  assert power[0][high].sum() < 0.1 * power[1][high].sum()
  assert abs(a[flat].mean() - b[flat].mean()) < 15  # same sinogram, same mean HU


def test_more_photons_give_smaller_error_and_zero_counts_are_clipped():
  clean = ck.radon(_disk(24) * 0.4, ck.default_angles(30)) / 10  # p up to about 2
  rng = np.random.default_rng(0)
  rmse = [np.sqrt(np.mean((ck.add_poisson_noise(clean, i0, rng) - clean) ** 2))
          for i0 in (1e3, 1e4, 1e5)]
  assert rmse[0] > rmse[1] > rmse[2] and rmse[0] > 2 * rmse[2]
  starved = ck.add_poisson_noise(np.full((2, 3), 50.0), 100, rng, scale=2.0)
  np.testing.assert_allclose(starved, np.log(100.0) / 2.0)  # counts 0 -> 1, then / scale
  with pytest.raises(DataError, match="i0"):
    ck.add_poisson_noise(clean, 0, rng)


def test_simulate_pair_shapes_dtypes_and_determinism():
  hu = np.where(_phantom() > 0.5, 40.0, -900.0)[..., None]  # (N, N, 1) accepted
  a, b = ck.simulate_pair(hu, num_views=60, rng=3)
  assert a.shape == b.shape == (N, N) and a.dtype == b.dtype == np.float32
  a2, b2 = ck.simulate_pair(hu, num_views=60, rng=np.random.default_rng(3))
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(b, b2)
  assert not np.array_equal(b, ck.simulate_pair(hu, num_views=60, rng=4)[1])
  assert np.all(a[~ck.circle_mask(N)] == -1000)
  water = _disk(24) * 1000 - 1000  # 0 HU inside, -1000 outside, anti-aliased edge
  clean_a, clean_b = ck.simulate_pair(water, num_views=100, i0=None)
  x, y = _coords()
  centre = x ** 2 + y ** 2 <= 15 ** 2
  assert abs(clean_a[centre].mean()) < 1 and abs(clean_b[centre].mean()) < 1
  assert np.abs(clean_a[centre]).max() < 3 and np.abs(clean_b[centre]).max() < 15
  with pytest.raises(DataError, match=r"\(64, 32\)"):
    ck.simulate_pair(np.zeros((64, 32)))
  with pytest.raises(DataError, match="gauss"):
    ck.simulate_pair(hu, filter_a="gauss")


# ---------------------------------------------------------------- the source


def _dicom(path, pixels):
  ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
  pixels = np.asarray(pixels, np.int16)
  ds.Rows, ds.Columns = pixels.shape
  ds.PixelData = pixels.tobytes()
  ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path)


@pytest.fixture
def ct_folder(tmp_path):
  root = tmp_path / "ct"
  body = np.where(_disk(12, 32) > 0.5, 1064, 24)  # 40 HU in air (-1000 HU)
  for p in range(6):
    for s in range(2):
      _dicom(root / f"p{p}" / f"s{s}.dcm", body + 10 * p + s)
  return root


SMALL = Simulation(num_views=24, i0=1e4)


def test_cached_pairs_are_built_once_and_rebuilt_when_a_parameter_changes(
    ct_folder, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  src = KernelPairSource(ct_folder, "all", image_size=32, simulation=SMALL, cache_dir=cache,
                         progress=False)
  assert len(src) == 12 and src.cache_path.is_file()
  rec = src[3]
  assert rec["image_a"].shape == rec["image_b"].shape == (32, 32, 1)
  assert rec["image_a"].dtype == np.float32 and rec["image_b"][0, 0, 0] == -1000  # air
  x, y = _coords(32)
  assert abs(rec["image_a"][x ** 2 + y ** 2 <= 36].mean() - 71) < 30  # p1/s1: 71 HU
  mtime = src.cache_path.stat().st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError("simulated again")
  monkeypatch.setattr(ck, "simulate_pair", fail)
  again = KernelPairSource(ct_folder, "all", image_size=32, simulation=SMALL,
                           cache_dir=cache, progress=False)
  assert again.cache_path == src.cache_path and src.cache_path.stat().st_mtime_ns == mtime
  np.testing.assert_array_equal(again[3]["image_b"], rec["image_b"])
  src.cache_path.write_bytes(b"damaged")  # an unreadable cache is rebuilt, not trusted
  monkeypatch.undo()
  rebuilt = KernelPairSource(ct_folder, "all", image_size=32, simulation=SMALL,
                             cache_dir=cache, progress=False)
  np.testing.assert_array_equal(rebuilt[3]["image_b"], rec["image_b"])  # same noise seeds
  copy = pickle.loads(pickle.dumps(again))
  np.testing.assert_array_equal(copy[3]["image_a"], rec["image_a"])
  other = KernelPairSource(ct_folder, "all", image_size=32, cache_dir=cache, progress=False,
                           simulation=Simulation(num_views=24, i0=2e4))
  assert other.cache_path != src.cache_path and len(list(cache.glob("*.npz"))) == 2
  assert not np.array_equal(other[3]["image_b"], rec["image_b"])
  unit = KernelPairSource(ct_folder, "val", image_size=32, simulation=SMALL, cache_dir=cache,
                          window=(-600, 1500), output="unit", progress=False)[0]["image_a"]
  assert unit.min() >= 0 and unit.max() <= 1


def test_interrupted_build_leaves_no_cache(ct_folder, tmp_path, monkeypatch):
  calls = []

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) > 3:
      raise KeyboardInterrupt
    return np.zeros((32, 32), np.float32), np.zeros((32, 32), np.float32)
  monkeypatch.setattr(ck, "simulate_pair", flaky)
  cache = tmp_path / "c"
  with pytest.raises(KeyboardInterrupt):
    KernelPairSource(ct_folder, "all", image_size=32, cache_dir=cache, progress=False)
  assert len(calls) == 4 and not list(cache.glob("*"))  # no partial .npz, no temporary
  monkeypatch.undo()

  def killed_while_writing(f, **arrays):
    f.write(b"PK half a file")
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", killed_while_writing)
  with pytest.raises(KeyboardInterrupt):
    KernelPairSource(ct_folder, "all", image_size=32, simulation=SMALL, cache_dir=cache,
                     progress=False)
  assert cache.is_dir() and not list(cache.glob("*"))


def test_patients_never_cross_splits(ct_folder, tmp_path):
  kw = dict(image_size=32, simulation=SMALL, cache_dir=tmp_path, progress=False,
            val_fraction=0.2, test_fraction=0.2)
  parts = {s: KernelPairSource(ct_folder, s, **kw) for s in ("train", "val", "test")}
  patients = {s: set(src.groups) for s, src in parts.items()}
  assert sum(len(src) for src in parts.values()) == 12
  assert all(patients[s] for s in patients)
  assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
              or patients["val"] & patients["test"])
  assert all(g == i.split("/")[0] for src in parts.values() for g, i in zip(src.groups, src.ids))
  assert len(list(tmp_path.glob("*.npz"))) == 1  # one cache for every split


def test_real_pairs_by_patient_and_file_name(tmp_path):
  root = tmp_path / "pairs"
  for k, offset in (("Br40", 0), ("Bl64", 5)):
    for p in ("p1", "p2", "p3"):
      (root / k / p).mkdir(parents=True)
      np.save(root / k / p / "001.npy", np.full((40, 40), 1024.0 + offset))
  src = KernelPairSource(root, "all", kernels=("Br40", "Bl64"), image_size=16,
                         value_offset=-1024)
  assert len(src) == 3 and src.groups == ["p1", "p2", "p3"] and src.cache_path is None
  rec = src[0]
  np.testing.assert_allclose(rec["image_a"], 0.0)
  np.testing.assert_allclose(rec["image_b"], 5.0)
  assert rec["image_a"].shape == (16, 16, 1)
  np.save(root / "Br40" / "p2" / "002.npy", np.zeros((40, 40)))
  with pytest.raises(DataError, match=r"Br40/p2/002\.npy has no pair.*Bl64/p2/002"):
    KernelPairSource(root, "all", kernels=("Br40", "Bl64"))
  with pytest.raises(DataError, match=r"pairs/B30f does not exist"):
    KernelPairSource(root, "all", kernels=("Br40", "B30f"))


def test_bad_input_names_the_path(tmp_path):
  with pytest.raises(DataError, match=r"nowhere does not exist"):
    KernelPairSource(tmp_path / "nowhere", cache_dir=tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty"):
    KernelPairSource(tmp_path / "empty", cache_dir=tmp_path, progress=False)
  with pytest.raises(DataError, match="needs window"):
    KernelPairSource(tmp_path, output="unit")


def test_covid_ct_pairs_smoke(data_dir, tmp_path):
  root = data_dir / "ct_covid19_ny_sbu_dicom"
  if not root.is_dir():
    pytest.skip(f"{root} not found")
  src = KernelPairSource(root, "all", image_size=64, max_slices=3, cache_dir=tmp_path,
                         progress=False)
  assert len(src) == 3 and len(set(src.groups)) >= 2
  for i in range(3):
    a, b = src[i]["image_a"][..., 0], src[i]["image_b"][..., 0]
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert a.min() < -500 and a.max() > 100  # air or lung, and tissue or bone
    assert b.std() > a.std() * 0.9 and abs(float(a.mean() - b.mean())) < 20
  assert os.path.getsize(src.cache_path) > 2 * 3 * 64 * 64 * 4
