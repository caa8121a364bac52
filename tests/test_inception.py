"""FID InceptionV3: architecture, weight loading and features.

No real weights exist here, so the flax network is checked against a PyTorch
reference of the same FID InceptionV3 written below (same module names) with random
weights and calibrated, perturbed BN statistics. Torch tests skip without torch; the
torch-free tests use an .npz exported from the flax model's own random init.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medrep_jax.eval import inception_weights as iw
from medrep_jax.models import inception

SMALL = 139  # smallest-cost size whose Mixed_7 maps are 3x3 (avoids XLA:CPU's 2x2 path)


def _random_variables(seed: int = 0) -> dict:
  """Random variables of the right shapes (numpy, no jax init), every leaf distinct."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(inception.variable_shapes()).items():
    if path[-1] == "kernel":  # He-normal over the HWI fan-in
      std = np.sqrt(2.0 / np.prod(leaf.shape[:3]))
      flat[path] = (std * rng.standard_normal(leaf.shape)).astype(np.float32)
    elif path[-1] in ("scale", "var"):
      flat[path] = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    else:  # bias, mean
      flat[path] = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.fixture(scope="module")
def flax_npz(tmp_path_factory):
  variables = _random_variables()
  path = iw.export_npz(variables, tmp_path_factory.mktemp("w") / "flax.npz")
  return variables, path


def test_param_count_matches_torchvision_without_aux_and_fc():
  shapes = inception.variable_shapes()
  # torchvision inception_v3: 27,161,264 - fc (2,049,000) - AuxLogits (3,326,696).
  assert inception.param_count(shapes) == 21_785_568
  assert inception.param_count(shapes, ("batch_stats",)) == 34_432


def test_export_npz_round_trips_exactly(flax_npz):
  variables, path = flax_npz
  with np.load(path) as data:
    assert data["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)  # OIHW
    assert data["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    np.testing.assert_array_equal(data["Mixed_5b.branch1x1.bn.running_var"],
                                  variables["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"])
    assert len(data.files) == 94 * 5
  _assert_trees_equal(iw.load_inception_params(path), variables)


def _rewrite(src, dst, edit):
  with np.load(src) as data:
    state = {k: data[k] for k in data.files}
  edit(state)
  np.savez(dst, **state)
  return dst


def test_bad_files_name_the_key(flax_npz, tmp_path):
  _, path = flax_npz
  key = "Mixed_6c.branch7x7dbl_3.conv.weight"
  missing = _rewrite(path, tmp_path / "missing.npz", lambda s: s.pop(key))
  with pytest.raises(ValueError, match=r"missing key.*Mixed_6c\.branch7x7dbl_3\.conv\.weight"
                     r" \(expected shape \(160, 160, 1, 7\)\)"):
    iw.load_inception_params(missing)

  def transpose(s):
    s[key] = s[key].transpose(0, 1, 3, 2)
  wrong = _rewrite(path, tmp_path / "wrong.npz", transpose)
  with pytest.raises(ValueError, match=r"Mixed_6c\.branch7x7dbl_3\.conv\.weight: expected "
                     r"shape \(160, 160, 1, 7\), got \(160, 160, 7, 1\)"):
    iw.load_inception_params(wrong)

  with np.load(path) as data:
    state = {k: data[k] for k in data.files}
  state["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  with pytest.raises(ValueError, match=r"extra\.pth is not.*1 unexpected key\(s\): "
                     r"AuxLogits\.conv0\.conv\.weight"):
    iw.state_dict_to_variables(state, source="extra.pth")
  iw.state_dict_to_variables(state, strict=False)  # fc.* and num_batches_tracked ignored

  with pytest.raises(FileNotFoundError, match="nope.npz"):
    iw.load_inception_params(tmp_path / "nope.npz")


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  path = tmp_path / "pt_inception.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match=r"pip install torch.*convert pt_inception\.pth "
                     r"pt_inception\.npz"):
    iw.load_inception_params(path)


def test_features_shape_grey_and_batching(flax_npz):
  _, path = flax_npz
  net = iw.InceptionFeatures(path, batch_size=2)
  assert net.label == "InceptionV3 (FID weights from flax.npz)"
  grey = np.random.default_rng(0).uniform(0, 1, (3, 64, 64, 1)).astype(np.float32)
  f_grey = net(grey)  # 3 images in batches of 2: the last batch is padded
  assert f_grey.shape == (3, 2048) and f_grey.dtype == np.float64
  assert np.isfinite(f_grey).all() and (f_grey >= 0).all()  # mean of ReLU outputs
  f_rgb = net(np.repeat(grey[1:], 3, axis=-1))  # different batch composition
  np.testing.assert_allclose(f_rgb, f_grey[1:], rtol=1e-5, atol=1e-5 * np.abs(f_grey).max())
  assert net(np.zeros((0, 64, 64, 3), np.float32)).shape == (0, 2048)
  with pytest.raises(ValueError, match="float"):
    net(np.zeros((1, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    net(np.full((1, 64, 64, 3), 255.0, np.float32))
  with pytest.raises(ValueError, match="C in"):
    net(np.zeros((1, 64, 64, 2), np.float32))


# ---------------------------------------------------------------- PyTorch reference


def _torch_fid_inception(seed: int = 0):
  """Random FID InceptionV3 in torch.nn, module names as in the PyTorch FID port."""
  torch = pytest.importorskip("torch")
  tnn, F = torch.nn, torch.nn.functional

  class BasicConv2d(tnn.Module):

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
      super().__init__()
      self.conv = tnn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
      self.bn = tnn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  class A(tnn.Module):

    def __init__(self, cin, pool_features):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 64, 1)
      self.branch5x5_1 = BasicConv2d(cin, 48, 1)
      self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
      self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
      b5 = self.branch5x5_2(self.branch5x5_1(x))
      b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg(x))], 1)

  class B(tnn.Module):

    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
      self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
      bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, 2)], 1)

  class C(tnn.Module):

    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = BasicConv2d(cin, 192, 1)
      self.branch7x7_1 = BasicConv2d(cin, c7, 1)
      self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
      self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
      self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = x
      for i in range(1, 6):
        bd = getattr(self, f"branch7x7dbl_{i}")(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

  class D(tnn.Module):

    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1 = BasicConv2d(cin, 192, 1)
      self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
      self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
      self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
      self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
      self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
      b7 = x
      for i in range(1, 5):
        b7 = getattr(self, f"branch7x7x3_{i}")(b7)
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

  class E(tnn.Module):

    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = BasicConv2d(cin, 320, 1)
      self.branch3x3_1 = BasicConv2d(cin, 384, 1)
      self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
      self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
      self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
      self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg(x)
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

  class FIDInception(tnn.Module):

    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
      self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
      self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
      self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
      self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a = D(768)
      self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
      self.fc = tnn.Linear(2048, 1008)  # in the real file; the loader ignores it

    def forward(self, x):  # pool3 features of NCHW input in [-1, 1]
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
      x = F.max_pool2d(x, 3, 2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, f"Mixed_{name}")(x)
      return x.mean((2, 3))

  torch.manual_seed(seed)
  model = FIDInception()
  bns = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.1)
      bn.momentum = None  # one train-mode batch sets running stats = batch stats
    model.train()
    model(torch.rand(4, 3, SMALL, SMALL) * 2 - 1)
    for bn in bns:  # then perturb them, so the statistics are "random" but well scaled
      bn.running_mean.add_(0.1 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt())
      bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4))
  return model.eval()


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  torch = pytest.importorskip("torch")
  model = _torch_fid_inception()
  folder = tmp_path_factory.mktemp("torch")
  state = model.state_dict()
  torch.save(state, folder / "ref.pth")
  np.savez(folder / "ref.npz", **{k: v.numpy() for k, v in state.items()})
  return model, folder / "ref.pth", folder / "ref.npz"


def _assert_features_close(ours, ref):
  scale = np.abs(ref).max()
  assert scale > 1e-2  # the reference features are not degenerate
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * scale)


def test_flax_matches_torch_reference(torch_files):
  torch = pytest.importorskip("torch")
  model, pth, npz = torch_files
  from_pth = iw.load_inception_params(pth)
  _assert_trees_equal(from_pth, iw.load_inception_params(npz))
  x = np.random.default_rng(1).uniform(-1, 1, (2, SMALL, SMALL, 3)).astype(np.float32)
  ours = jax.jit(inception.InceptionV3FID().apply)(from_pth, jnp.asarray(x))
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert ours.shape == ref.shape == (2, 2048)
  _assert_features_close(np.asarray(ours), ref)


def test_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  for size in (64, 320):  # up- and down-sampling
    x = rng.uniform(0, 1, (2, size, size + 7, 3)).astype(np.float32)
    ours = np.asarray(iw.resize_for_inception(jnp.asarray(x)))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                          size=(299, 299), mode="bilinear",
                                          align_corners=False)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy() * 2 - 1, atol=1e-5)


def test_features_match_torch_at_299_and_cli(torch_files, tmp_path):
  torch = pytest.importorskip("torch")
  model, pth, _ = torch_files
  out = tmp_path / "converted.npz"
  assert iw.main(["convert", str(pth), str(out)]) == 0
  with pytest.raises(SystemExit):  # argparse error naming the file, no traceback
    iw.main(["convert", str(tmp_path / "missing.pth"), str(out)])
  _assert_trees_equal(iw.load_inception_params(out), iw.load_inception_params(pth))
  net = iw.InceptionFeatures(pth, batch_size=2)
  assert net.label == "InceptionV3 (FID weights from ref.pth)"
  images = np.random.default_rng(3).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                      align_corners=False)
  with torch.no_grad():
    ref = model(x * 2 - 1).numpy()
  _assert_features_close(net(images), ref)
