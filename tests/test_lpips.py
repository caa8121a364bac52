"""LPIPS-VGG: architecture, metric properties, weight files and LPIPS diversity.

No real LPIPS weights exist here, so every test uses random VGG weights (He-normal, so
that activations survive 13 ReLU layers) at 32x32 with batches of 2. One test compares
with an independent PyTorch LPIPS written below under the official state-dict names;
it skips without torch.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medrep_jax.eval import lpips

SIZE = 32


def _random_params(seed: int = 0, lin: str = "uniform") -> dict:
  """Random LPIPS-VGG params (numpy, no jax init); lin "uniform" in [0.1, 1) or "ones"."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in lpips.expected_shapes().items():
    if key.endswith("/kernel"):
      std = np.sqrt(2.0 / np.prod(shape[:3]))
      flat[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    elif key.endswith("/bias"):
      flat[key] = rng.normal(0.0, 0.05, shape).astype(np.float32)
    else:
      flat[key] = (np.ones(shape, np.float32) if lin == "ones"
                   else rng.uniform(0.1, 1.0, shape).astype(np.float32))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _images(seed: int, n: int = 2, c: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 1, (n, SIZE, SIZE, c)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  return _random_params()


@pytest.fixture(scope="module")
def net(params):
  return lpips.LPIPSNet(params, batch_size=2)


@pytest.fixture(scope="module")
def npz(params, tmp_path_factory):
  return lpips.save_lpips_npz(params, tmp_path_factory.mktemp("w") / "lpips_vgg.npz")


def _rewrite(src, dst, edit):
  with np.load(src) as data:
    state = {k: data[k] for k in data.files}
  edit(state)
  np.savez(dst, **state)
  return dst


def test_param_tree_matches_npz_key_table():
  x = jnp.zeros((1, SIZE, SIZE, 3))
  shapes = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0), x, x)["params"]
  flat = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  assert flat == lpips.expected_shapes()
  vgg = sum(np.prod(s) for k, s in flat.items() if k.startswith("vgg/"))
  lin = sum(np.prod(s) for k, s in flat.items() if k.startswith("lin/"))
  assert (vgg, lin) == (14_714_688, 1_472)  # torchvision vgg16().features; 64+..+512
  assert lpips.TORCH_CONV_INDEX[0] == (1, 1) and lpips.TORCH_CONV_INDEX[28] == (5, 3)
  assert sorted(lpips.TORCH_CONV_INDEX) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def test_distance_to_itself_is_zero(net):
  x = _images(0)
  d = net(x, x)
  assert d.shape == (2,) and d.dtype == np.float64
  np.testing.assert_array_equal(d, 0.0)


def test_symmetric_and_non_negative(net):
  x, y = _images(1), _images(2)
  d_xy, d_yx = net(x, y), lpips.lpips_distance(net, y, x)
  assert (d_xy > 0).all() and np.isfinite(d_xy).all()
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
  assert (net(np.zeros_like(x), np.ones_like(x)) >= 0).all()


def test_more_perturbation_is_farther():
  net = lpips.LPIPSNet(_random_params(lin="ones"), batch_size=2)
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
  base = np.stack([0.5 + 0.3 * np.sin(6 * xx), 0.5 + 0.3 * np.cos(5 * yy), xx * yy], -1)
  noise = rng.standard_normal(base.shape)
  x = np.stack([base, base]).astype(np.float32)
  y = np.clip(np.stack([base + 0.02 * noise, base + 0.2 * noise]), 0, 1).astype(np.float32)
  d_small, d_large = net(x, y)
  assert 0 < d_small < d_large


def test_channel_normalization_and_distance_match_numpy(net, params):
  x, y = _images(4), _images(5)
  apply = jax.jit(net.module.apply, static_argnames="method")
  raw_x, raw_y = (apply({"params": net.params}, v * 2 - 1, method=lpips.LPIPS.raw_features)
                  for v in (x, y))
  normed = apply({"params": net.params}, x * 2 - 1, method=lpips.LPIPS.features)
  assert [f.shape[1:] for f in raw_x] == [(32, 32, 64), (16, 16, 128), (8, 8, 256),
                                          (4, 4, 512), (2, 2, 512)]
  f = np.asarray(raw_x[0], np.float64)  # relu1_2
  ref = f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)
  np.testing.assert_allclose(np.asarray(normed[0]), ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(ref, axis=-1), 1.0, rtol=1e-6)

  expected = 0.0
  for a, b, layer in zip(raw_x, raw_y, lpips.LAYERS):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
    nb = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
    expected = expected + ((na - nb) ** 2 * params["lin"][layer]).sum(-1).mean((1, 2))
  np.testing.assert_allclose(net(x, y), expected, rtol=1e-5)


def test_scaling_layer_constants():
  x = jnp.asarray([[[[-1.0, 0.0, 1.0]]]])
  np.testing.assert_allclose(np.asarray(lpips.scale_input(x))[0, 0, 0],
                             [(-1 + .030) / .458, (0 + .088) / .448, (1 + .188) / .450],
                             rtol=1e-6)
  g = np.asarray(lpips.scale_input(jnp.full((1, 1, 1, 1), 0.5)))[0, 0, 0]
  np.testing.assert_allclose(g, (0.5 - np.array(lpips.SHIFT)) / np.array(lpips.SCALE),
                             rtol=1e-6)


def test_normalize_channels_zero_vector_has_finite_gradient():
  grad = jax.grad(lambda f: lpips.normalize_channels(f).sum())(jnp.zeros((2, 4)))
  assert np.isfinite(np.asarray(grad)).all()


def test_grey_equals_its_rgb_repetition(net):
  x, y = _images(6, c=1), _images(7, c=1)
  np.testing.assert_allclose(net(x, y), net(np.repeat(x, 3, -1), np.repeat(y, 3, -1)),
                             rtol=1e-6)


def test_save_load_round_trip_is_exact(net, npz, params):
  with np.load(npz) as data:
    assert set(data.files) == set(lpips.expected_shapes())
    assert data["vgg/conv1_1/kernel"].shape == (3, 3, 3, 64)
    np.testing.assert_array_equal(data["lin/relu3_3"], params["lin"]["relu3_3"])
  loaded = lpips.load_lpips(npz, batch_size=2)
  assert loaded.label == "LPIPS-VGG (weights from lpips_vgg.npz)"
  for k, v in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(loaded.params)[k]), v)
  x, y = _images(8), _images(9)
  np.testing.assert_array_equal(loaded(x, y), net(x, y))


def test_missing_key_error_names_key_and_file(npz, tmp_path):
  bad = _rewrite(npz, tmp_path / "missing.npz", lambda s: s.pop("vgg/conv4_2/bias"))
  with pytest.raises(ValueError, match=r"missing\.npz is not an LPIPS-VGG weight file: 1 "
                     r"missing key\(s\): vgg/conv4_2/bias \(expected shape \(512,\)\)"):
    lpips.load_lpips(bad)


def test_wrong_shape_error_names_key_and_file(npz, tmp_path):
  def to_oihw(s):
    s["vgg/conv2_1/kernel"] = s["vgg/conv2_1/kernel"].transpose(3, 2, 0, 1)
    s["lin/relu5_3"] = s["lin/relu5_3"].reshape(1, 512, 1, 1)
  bad = _rewrite(npz, tmp_path / "oihw.npz", to_oihw)
  with pytest.raises(ValueError, match=r"oihw\.npz is not.*2 shape mismatch\(es\): "
                     r"vgg/conv2_1/kernel: expected shape \(3, 3, 64, 128\), got "
                     r"\(128, 64, 3, 3\), lin/relu5_3: expected shape \(512,\), got "
                     r"\(1, 512, 1, 1\)"):
    lpips.load_lpips(bad)


def test_other_bad_files(npz, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
    lpips.load_lpips(tmp_path / "nope.npz")
  extra = _rewrite(npz, tmp_path / "extra.npz",
                   lambda s: s.update({"classifier/kernel": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"extra\.npz.*1 unexpected key\(s\): classifier/kernel"):
    lpips.load_lpips(extra)
  lpips.load_lpips(extra, strict=False)

  def negate(s):
    s["lin/relu2_2"] = -s["lin/relu2_2"]
  neg = _rewrite(npz, tmp_path / "neg.npz", negate)
  with pytest.raises(ValueError, match=r"neg\.npz.*negative lin weight\(s\) in lin/relu2_2"):
    lpips.load_lpips(neg)
  pth = tmp_path / "vgg.pth"
  pth.write_bytes(b"not read")
  with pytest.raises(ValueError, match=r"vgg\.pth.*expected \.npz.*params_from_torch"):
    lpips.load_lpips(pth)
  with pytest.raises(ValueError, match=r"writes \.npz"):
    lpips.save_lpips_npz(_random_params(), tmp_path / "w.pth")


def test_input_validation(net):
  x = _images(0)
  with pytest.raises(ValueError, match="same shape"):
    net(x, x[:1])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    net(x * 255, x)
  with pytest.raises(ValueError, match="float"):
    net(x.astype(np.uint8), x.astype(np.uint8))
  with pytest.raises(ValueError, match="at least 16x16"):
    net(x[:, :8], x[:, :8])
  with pytest.raises(ValueError, match=r"C in \{1, 3\}"):
    net(x[..., :2], x[..., :2])
  assert net(x[:0], x[:0]).shape == (0,)


def _samples(seed: int, m: int = 2, k: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 1, (m, k, SIZE, SIZE, 3)).astype(np.float32)


def test_diversity_of_identical_samples_is_zero(net):
  same = np.repeat(_samples(10, k=1), 3, axis=1)
  assert lpips.diversity_lpips(net, same) == 0.0
  with pytest.raises(ValueError, match="K >= 2"):
    lpips.diversity_lpips(net, same[:, :1])


def test_diversity_matches_brute_force_over_pairs(net):
  s = _samples(11)  # M=2 masks of K=3: one mask per jitted call (batch_size 2)
  m, k = s.shape[:2]
  pairs = list(itertools.combinations(range(k), 2))
  x = np.stack([s[i, a] for i in range(m) for a, _ in pairs])
  y = np.stack([s[i, b] for i in range(m) for _, b in pairs])
  brute = net(x, y).reshape(m, len(pairs)).mean(1)
  per_mask = lpips.diversity_lpips(net, s, per_mask=True)
  np.testing.assert_allclose(per_mask, brute, rtol=1e-5)
  assert lpips.diversity_lpips(net, s) == pytest.approx(brute.mean(), rel=1e-5)


def test_params_from_torch_maps_official_names(params):
  """torchvision features.{idx} (OIHW) + LPIPS lin{k}.model.1.weight (1, C, 1, 1)."""
  state = {"classifier.0.weight": np.zeros((2, 2)), "scaling_layer.shift": np.zeros(3)}
  for idx, (b, i) in lpips.TORCH_CONV_INDEX.items():
    state[f"features.{idx}.weight"] = params["vgg"][f"conv{b}_{i}"]["kernel"].transpose(
        3, 2, 0, 1)
    state[f"features.{idx}.bias"] = params["vgg"][f"conv{b}_{i}"]["bias"]
  for k, layer in enumerate(lpips.LAYERS):
    state[f"lin{k}.model.1.weight"] = params["lin"][layer].reshape(1, -1, 1, 1)
    state[f"lins.{k}.model.1.weight"] = state[f"lin{k}.model.1.weight"]  # full LPIPS dict
  converted = lpips.params_from_torch(state)
  for key, v in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(converted)[key], v)
  # The LPIPS module's own names for the trunk: net.slice{s}.{idx}.
  sliced = {k.replace("features.0.", "net.slice1.0."): v for k, v in state.items()}
  np.testing.assert_array_equal(lpips.params_from_torch(sliced)["vgg"]["conv1_1"]["kernel"],
                                params["vgg"]["conv1_1"]["kernel"])

  broken = {k: v for k, v in state.items() if not k.startswith(("features.26.", "lin"))}
  with pytest.raises(ValueError, match=r"vgg\.pth is not.*missing key\(s\): "
                     r"features\.26\.weight, features\.26\.bias, lin0\.model\.1\.weight"):
    lpips.params_from_torch(broken, source="vgg.pth")
  state["features.28.weight"] = state["features.28.weight"].transpose(0, 1, 3, 2)[:, :5]
  with pytest.raises(ValueError, match=r"features\.28\.weight: expected shape "
                     r"\(512, 512, 3, 3\), got \(512, 5, 3, 3\)"):
    lpips.params_from_torch(state)


def test_matches_independent_torch_lpips(params, net):
  """A PyTorch LPIPS-VGG under the official names, loaded via params_from_torch."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn

  class Lin(tnn.Module):
    def __init__(self, c):
      super().__init__()
      self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False))

  class TorchLPIPS(tnn.Module):
    def __init__(self):
      super().__init__()
      layers, c_in = [], 3
      for b, widths in enumerate(lpips.VGG_BLOCKS):
        if b:
          layers.append(tnn.MaxPool2d(2, 2))
        for w in widths:
          layers += [tnn.Conv2d(c_in, w, 3, padding=1), tnn.ReLU()]
          c_in = w
      self.features = tnn.Sequential(*layers)
      for k, c in enumerate(lpips.LAYER_CHANNELS):
        setattr(self, f"lin{k}", Lin(c))
      self.taps = [3, 8, 15, 22, 29]  # relu1_2 .. relu5_3

    def forward(self, x, y):  # NCHW in [-1, 1]
      shift = torch.tensor(lpips.SHIFT).view(1, 3, 1, 1)
      scale = torch.tensor(lpips.SCALE).view(1, 3, 1, 1)
      total = 0
      fx, fy = (x - shift) / scale, (y - shift) / scale
      k = 0
      for idx, layer in enumerate(self.features):
        fx, fy = layer(fx), layer(fy)
        if idx in self.taps:
          nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
          ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
          total = total + getattr(self, f"lin{k}").model((nx - ny) ** 2).mean((2, 3))
          k += 1
      return total.flatten()

  torch.manual_seed(0)
  model = TorchLPIPS().eval()
  with torch.no_grad():  # lin weights >= 0, as trained LPIPS weights are
    for k in range(5):
      getattr(model, f"lin{k}").model[1].weight.abs_()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  converted = lpips.LPIPSNet(lpips.params_from_torch(state), batch_size=2)
  x, y = _images(12), _images(13)
  with torch.no_grad():
    ref = model(*(torch.from_numpy(v.transpose(0, 3, 1, 2) * 2 - 1) for v in (x, y)))
  np.testing.assert_allclose(converted(x, y), ref.numpy(), rtol=1e-4)
