"""The sub-pixel stride-2 transposed conv equals flax's ConvTranspose (models/conv_transpose.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax.models import conv_transpose
from medrep_jax.models.conv_transpose import ConvTranspose2x


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_flax_conv_transpose(k, use_bias, monkeypatch):
  monkeypatch.setenv("MEDREP_CONV_TRANSPOSE", "subpixel")
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 3))
  ours = ConvTranspose2x(4, k, use_bias=use_bias)
  flax_ = nn.ConvTranspose(4, (k, k), (2, 2), padding="SAME", use_bias=use_bias)
  variables = ours.init(jax.random.PRNGKey(0), x)
  ref_vars = flax_.init(jax.random.PRNGKey(0), x)
  # same parameter tree and initial values: checkpoints are interchangeable
  jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(2), v.shape),
                           variables)
  y, y_ref = ours.apply(variables, x), flax_.apply(variables, x)
  assert y.shape == (2, 10, 14, 4)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  probe = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  grads = jax.grad(lambda v, x: jnp.sum(ours.apply(v, x) * probe), (0, 1))(variables, x)
  ref = jax.grad(lambda v, x: jnp.sum(flax_.apply(v, x) * probe), (0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grads, ref)


def test_bfloat16_compute_and_xla_switch(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 2))
  mod = ConvTranspose2x(3, 4, dtype=jnp.bfloat16)
  variables = mod.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  monkeypatch.setenv("MEDREP_CONV_TRANSPOSE", "subpixel")
  y_sub = mod.apply(variables, x)
  monkeypatch.setenv("MEDREP_CONV_TRANSPOSE", "xla")
  y_xla = mod.apply(variables, x)
  assert y_sub.dtype == y_xla.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(y_sub), np.float32(y_xla), atol=0.05)


def test_bad_mode_and_kernel_are_named(monkeypatch):
  monkeypatch.setenv("MEDREP_CONV_TRANSPOSE", "fast")
  with pytest.raises(ValueError, match="MEDREP_CONV_TRANSPOSE"):
    conv_transpose.use_subpixel()
  with pytest.raises(ValueError, match="size 2-4"):
    conv_transpose.conv_transpose_2x(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 1, 1)))


def test_auto_takes_subpixel_only_for_large_maps_on_cpu(monkeypatch):
  monkeypatch.delenv("MEDREP_CONV_TRANSPOSE", raising=False)
  big, small = conv_transpose.SUBPIXEL_MIN_MACS, conv_transpose.SUBPIXEL_MIN_MACS - 1
  assert conv_transpose.use_subpixel(big) == (jax.default_backend() == "cpu")
  assert not conv_transpose.use_subpixel(small)  # tiny maps: XLA's form compiles faster
  monkeypatch.setenv("MEDREP_CONV_TRANSPOSE", "subpixel")
  assert conv_transpose.use_subpixel(small)
  monkeypatch.setenv("MEDREP_CONV_TRANSPOSE", "xla")
  assert not conv_transpose.use_subpixel(big)
