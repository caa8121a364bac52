"""Tests for medrep_jax.models.vae and medrep_jax.losses.vae."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medrep_jax.losses import vae as vae_losses
from medrep_jax.models import vae


def _key(seed=0):
  # rbg keys: XLA:CPU compiles threefry programs ~10x slower.
  return jax.random.key(seed, impl="rbg")


def _uniform(seed, shape, lo=-1.0, hi=1.0):
  return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=shape), jnp.float32)


def _tiny(in_channels=1, **kw):
  return vae.AutoencoderKL(in_channels=in_channels, **{**vae.vae_config("tiny"), **kw})


def _spec(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@pytest.fixture(scope="module")
def grey():
  """One tiny grey VAE and its variables (conv params fit any image size)."""
  model = _tiny(1)
  variables = jax.jit(lambda x: model.init(_key(), x))(jnp.zeros((2, 32, 32, 1)))
  return model, variables


# ---------------------------------------------------------------- DiagonalGaussian


def _np_kl(mean, logvar):
  kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(1)


def test_kl_matches_numpy_and_is_zero_at_standard_normal():
  mean = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
  logvar = np.random.default_rng(1).normal(size=(3, 4, 4, 2)).astype(np.float32)
  post = vae.DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  np.testing.assert_allclose(post.kl(), _np_kl(mean, logvar), rtol=1e-5)
  np.testing.assert_allclose(vae_losses.kl_loss(post), _np_kl(mean, logvar), rtol=1e-5)
  assert np.all(np.asarray(post.kl()) > 0)
  std_normal = vae.DiagonalGaussian(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4)))
  np.testing.assert_allclose(std_normal.kl(), np.zeros(2), atol=1e-7)


def test_from_moments_splits_and_clips_logvar():
  moments = jnp.concatenate([jnp.full((1, 2, 2, 3), 0.5), jnp.asarray(
      [100.0, -100.0, 1.0]).reshape(1, 1, 1, 3) * jnp.ones((1, 2, 2, 3))], -1)
  post = vae.DiagonalGaussian.from_moments(moments.astype(jnp.bfloat16))
  assert post.mean.dtype == post.logvar.dtype == jnp.float32
  np.testing.assert_allclose(post.mean, 0.5)
  np.testing.assert_allclose(post.logvar[0, 0, 0], [vae.LOGVAR_MAX, vae.LOGVAR_MIN, 1.0])


def test_sample_is_reparameterized_and_mode_is_mean():
  mean, logvar = _uniform(0, (2, 4, 4, 3)), _uniform(1, (2, 4, 4, 3), -2, 2)
  post = vae.DiagonalGaussian(mean, logvar)
  key = _key(3)
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  np.testing.assert_allclose(post.sample(key), mean + np.exp(0.5 * logvar) * eps,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(post.mode(), mean)
  assert not np.allclose(post.sample(key), post.sample(_key(4)))
  # The gradient of a sample w.r.t. the mean is 1 (reparameterization trick).
  g = jax.grad(lambda m: jnp.sum(vae.DiagonalGaussian(m, logvar).sample(key)))(mean)
  np.testing.assert_allclose(g, 1.0)


def test_estimate_scale_factor():
  z = 2.0 * np.random.default_rng(0).normal(size=(4, 8, 8, 3)) + 0.3
  s = vae.estimate_scale_factor(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(s, 1.0 / z.std(), rtol=1e-5)
  np.testing.assert_allclose(np.std(np.asarray(z) * float(s)), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- AutoencoderKL


@pytest.fixture(scope="module")
def grey_out(grey):
  """(x, posterior, decode(mode)) of the fp32 grey VAE at 32 px, via method=."""
  model, variables = grey
  x = _uniform(0, (2, 32, 32, 1))

  @jax.jit
  def run(v, x):
    post = model.apply(v, x, method=model.encode)
    return post, model.apply(v, post.mode(), method="decode")

  return (x, *run(variables, x))


def test_grey_32px_shapes_f4(grey, grey_out):
  model, _ = grey
  _, post, rec = grey_out
  assert model.downsample_factor == 4
  chex.assert_shape([post.mean, post.logvar], (2, 8, 8, 3))
  chex.assert_shape(rec, (2, 32, 32, 1))
  assert rec.dtype == post.mean.dtype == jnp.float32
  chex.assert_tree_all_finite((post, rec))


def test_grey_64px_sampled_call(grey):
  model, variables = grey
  x = _uniform(1, (2, 64, 64, 1))
  fn = jax.jit(lambda v, x, k: model.apply(v, x, k))
  rec_a, post = fn(variables, x, _key(1))
  rec_b, _ = fn(variables, x, _key(2))
  chex.assert_shape(post.mean, (2, 16, 16, 3))
  chex.assert_shape(rec_a, (2, 64, 64, 1))
  assert not np.allclose(rec_a, rec_b)  # The posterior is sampled.


def test_rgb_and_paper_shapes_and_param_dtypes():
  for size, hw, lat in (("tiny", 32, 8), ("paper", 256, 64)):
    model = vae.AutoencoderKL(in_channels=3, dtype=jnp.bfloat16, **vae.vae_config(size))
    variables = jax.eval_shape(lambda m=model, hw=hw: m.init(_key(), jnp.zeros((1, hw, hw, 3))))
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    rec, post = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, _key()), variables,
                               _spec((2, hw, hw, 3)))
    assert post.mean.shape == (2, lat, lat, 3) and post.mean.dtype == jnp.float32
    assert rec.shape == (2, hw, hw, 3) and rec.dtype == jnp.float32
  assert "attn" in variables["params"]["encoder"]["mid"]  # Paper preset has mid attention.


def test_bf16_call_close_to_fp32_decode_of_mode(grey, grey_out):
  _, variables = grey
  x, post32, rec32 = grey_out
  model16 = _tiny(1, dtype=jnp.bfloat16)  # Same param tree: params are fp32 anyway.
  rec16, post16 = jax.jit(lambda v, x: model16.apply(v, x, sample_posterior=False))(
      variables, x)
  assert rec16.dtype == post16.mean.dtype == jnp.float32
  chex.assert_tree_all_finite((rec16, post16))
  for got, want in ((rec16, rec32), (post16.mean, post32.mean)):
    rel = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
    assert rel < 0.1, rel  # bf16 keeps ~3 digits; errors compound over ~25 layers.


def test_bad_inputs_raise(grey):
  model, variables = grey
  with pytest.raises(ValueError, match="channels"):
    jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables,
                   _spec((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables,
                   _spec((1, 30, 30, 1)))
  with pytest.raises(Exception, match="sample"):  # Sampling without a key.
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, _spec((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="valid sizes"):
    vae.vae_config("huge")


# ---------------------------------------------------------------- PatchDiscriminator


def test_patch_discriminator_shapes():
  disc = vae.PatchDiscriminator(base_width=8, num_layers=3, norm="group")
  x = _uniform(0, (2, 32, 32, 3))
  logits, variables = jax.jit(
      lambda x: (lambda v: (disc.apply(v, x), v))(disc.init(_key(), x)))(x)
  chex.assert_shape(logits, (2, 2, 2, 1))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  big = vae.PatchDiscriminator(dtype=jnp.bfloat16, norm="none")
  v = jax.eval_shape(lambda: big.init(_key(), jnp.zeros((1, 256, 256, 1))))
  assert {x.dtype for x in jax.tree_util.tree_leaves(v)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(big.apply, v, _spec((2, 256, 256, 1)))
  assert out.shape == (2, 30, 30, 1) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="at least"):
    jax.eval_shape(disc.apply, variables, _spec((1, 16, 16, 3)))


# ---------------------------------------------------------------- losses


def test_reconstruction_loss_matches_numpy():
  x, r = _uniform(0, (3, 4, 4, 2)), _uniform(1, (3, 4, 4, 2))
  d = np.asarray(x) - np.asarray(r)
  l1 = vae_losses.reconstruction_loss(x, r)
  np.testing.assert_allclose(l1, np.abs(d).reshape(3, -1).mean(1), rtol=1e-6)
  np.testing.assert_allclose(vae_losses.reconstruction_loss(x, r, "l2", "sum"),
                             (d ** 2).reshape(3, -1).sum(1), rtol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    vae_losses.reconstruction_loss(x, r, "l3")
  with pytest.raises(ValueError, match="shapes"):
    vae_losses.reconstruction_loss(x, r[:, :2])


def test_vae_loss_matches_numpy():
  x, r = _uniform(0, (2, 8, 8, 1)), _uniform(1, (2, 8, 8, 1))
  mean, logvar = _uniform(2, (2, 2, 2, 3)), _uniform(3, (2, 2, 2, 3))
  post = vae.DiagonalGaussian(mean, logvar)
  d = np.abs(np.asarray(x) - np.asarray(r)).reshape(2, -1)
  kl = _np_kl(np.asarray(mean), np.asarray(logvar))
  loss, metrics = vae_losses.vae_loss(x, r, post, kl_weight=0.1)
  np.testing.assert_allclose(loss, np.mean(d.sum(1) + 0.1 * kl), rtol=1e-5)
  np.testing.assert_allclose(metrics["rec_loss"], d.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl.mean(), rtol=1e-5)
  # With a learned output log-variance: sum(|x - r| / exp(lv) + lv).
  loss_lv, metrics_lv = vae_losses.vae_loss(x, r, post, kl_weight=0.1, rec="l1", logvar=0.5)
  nll = d.sum(1) / np.exp(0.5) + 0.5 * d.shape[1]
  np.testing.assert_allclose(loss_lv, np.mean(nll + 0.1 * kl), rtol=1e-5)
  assert set(metrics_lv) == {"loss", "rec_loss", "nll", "kl", "logvar"}


def test_hinge_and_generator_losses_by_hand():
  real = jnp.asarray([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2], mean 5/6.
  fake = jnp.asarray([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2], mean 1.
  np.testing.assert_allclose(vae_losses.d_hinge_loss(real, fake), 0.5 * (5 / 6 + 1), rtol=1e-6)
  np.testing.assert_allclose(vae_losses.d_hinge_loss(jnp.ones(4), -jnp.ones(4)), 0.0)
  np.testing.assert_allclose(vae_losses.g_loss(fake), 1 / 3, rtol=1e-6)


def test_gan_weights():
  np.testing.assert_allclose(vae_losses.adopt_weight(9, 10, 0.5), 0.0)
  np.testing.assert_allclose(jax.jit(vae_losses.adopt_weight, static_argnums=1)(
      jnp.asarray(10), 10, 0.5), 0.5)
  w = vae_losses.adaptive_gan_weight(jnp.asarray(2.0), jnp.asarray(1.0), eps=0.0)
  np.testing.assert_allclose(w, 2.0)
  np.testing.assert_allclose(vae_losses.adaptive_gan_weight(jnp.asarray(1.0),
                                                            jnp.asarray(0.0)), 1e4)
  g = jax.grad(lambda a: vae_losses.adaptive_gan_weight(a, jnp.asarray(1.0)))(jnp.asarray(2.0))
  np.testing.assert_allclose(g, 0.0)


# ---------------------------------------------------------------- overfitting


def _phantoms(n=4, size=16):
  yy, xx = np.mgrid[0:size, 0:size] / size
  rng = np.random.default_rng(0)
  imgs = []
  for i in range(n):
    cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
    disc = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 0.8, -0.6)
    imgs.append(disc + 0.3 * np.sin(2 * np.pi * (i + 1) * xx))
  return jnp.asarray(np.stack(imgs)[..., None], jnp.float32)


def test_tiny_vae_overfits_four_images(grey):
  model, variables = grey  # Conv params are size-independent: reuse them at 16 px.
  x = _phantoms()
  tx = optax.adam(1e-3)

  def loss_fn(params, key):
    rec, post = model.apply({"params": params}, x, key)
    return vae_losses.vae_loss(x, rec, post, kl_weight=1e-6)

  @jax.jit
  def step(params, opt_state, key, i):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, jax.random.fold_in(key, i))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics["rec_loss"]

  params, opt_state, key = variables["params"], tx.init(variables["params"]), _key(5)
  recs = []
  for i in range(50):
    params, opt_state, rec = step(params, opt_state, key, i)
    recs.append(rec)
  recs = np.asarray(recs)
  # Baseline: predicting the batch-mean image.
  mean_img_l1 = float(jnp.mean(jnp.abs(x - x.mean(0, keepdims=True))))
  assert np.all(np.isfinite(recs))
  assert recs[-1] < recs[0] / 3, recs[[0, -1]]
  assert recs[-1] < 0.5 * mean_img_l1, (recs[-1], mean_img_l1)
