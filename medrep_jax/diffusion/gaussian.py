"""Gaussian diffusion: forward process, parameterizations, p(x_{t-1}|x_t), losses, CFG.

Pure functions of (schedule, arrays). Conventions:
  * `t` is an int array (B,) (or a scalar) of indices into the `Schedule`; for a
    schedule that is not respaced this is the timestep itself.
  * Images are channels-last; with a learned variance the model output has 2C
    channels, the first C the eps/x0/v prediction and the last C the variance value v.
  * Every loss returns per-example values (B,) (a mean over the non-batch axes), so
    callers can weight them and take the mean.

References: Ho et al. 2020 (DDPM); Nichol & Dhariwal 2021 (improved DDPM);
Salimans & Ho 2022 (v-prediction); Ho & Salimans 2022 (classifier-free guidance).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special

from medrep_jax.diffusion.schedules import Schedule

Array = jax.Array
PARAMETERIZATIONS = ("eps", "x0", "v")


def _at(arr: Array, t: Array, ndim: int) -> Array:
  """arr[t], reshaped to broadcast against an array of rank `ndim` with batch axis t."""
  v = jnp.asarray(arr)[t]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _mean_flat(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------- forward process


def q_sample(sched: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(a-bar_t) x0 + sqrt(1 - a-bar_t) eps (DDPM eq. 4)."""
  return (_at(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _at(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior(sched: Schedule, x0: Array, xt: Array,
                t: Array) -> tuple[Array, Array, Array]:
  """q(x_{t-1} | x_t, x0) = N(mu-tilde, beta-tilde I) (DDPM eqs. 6-7).

  Returns:
    (mean, variance, log_variance_clipped), each with the shape of `xt`.
  """
  mean = (_at(sched.posterior_mean_coef1, t, xt.ndim) * x0
          + _at(sched.posterior_mean_coef2, t, xt.ndim) * xt)
  var = jnp.broadcast_to(_at(sched.posterior_variance, t, xt.ndim), xt.shape)
  log_var = jnp.broadcast_to(_at(sched.posterior_log_variance_clipped, t, xt.ndim), xt.shape)
  return mean, var, log_var


# ---------------------------------------------------------------- parameterizations


def to_x0_eps(output: Array, xt: Array, sqrt_ab: Array, sqrt_1m_ab: Array,
              parameterization: str) -> tuple[Array, Array]:
  """(x0, eps) from a model output, given broadcastable sqrt(a-bar) and sqrt(1 - a-bar).

  eps: x0 = (x_t - sqrt(1 - a-bar) eps) / sqrt(a-bar) (DDPM eq. 4 solved for x0).
  x0: eps = (x_t - sqrt(a-bar) x0) / sqrt(1 - a-bar).
  v (Salimans & Ho 2022, Sec. 4 / App. D): v = sqrt(a-bar) eps - sqrt(1 - a-bar) x0, so
  x0 = sqrt(a-bar) x_t - sqrt(1 - a-bar) v and eps = sqrt(a-bar) v + sqrt(1 - a-bar) x_t.
  """
  if parameterization == "eps":
    return (xt - sqrt_1m_ab * output) / sqrt_ab, output
  if parameterization == "x0":
    return output, (xt - sqrt_ab * output) / sqrt_1m_ab
  if parameterization == "v":
    return sqrt_ab * xt - sqrt_1m_ab * output, sqrt_ab * output + sqrt_1m_ab * xt
  raise ValueError(f"parameterization={parameterization!r}; expected one of {PARAMETERIZATIONS}")


def predict_x0_from_eps(sched: Schedule, xt: Array, t: Array, eps: Array) -> Array:
  """x0 = sqrt(1/a-bar_t) x_t - sqrt(1/a-bar_t - 1) eps (DDPM eq. 4 inverted)."""
  return (_at(sched.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
          - _at(sched.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps)


def predict_eps_from_x0(sched: Schedule, xt: Array, t: Array, x0: Array) -> Array:
  """eps = (sqrt(1/a-bar_t) x_t - x0) / sqrt(1/a-bar_t - 1)."""
  return ((_at(sched.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0)
          / _at(sched.sqrt_recipm1_alphas_cumprod, t, xt.ndim))


def v_from(sched: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """v = sqrt(a-bar_t) eps - sqrt(1 - a-bar_t) x0 (Salimans & Ho 2022)."""
  return (_at(sched.sqrt_alphas_cumprod, t, x0.ndim) * noise
          - _at(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def x0_from_v(sched: Schedule, xt: Array, t: Array, v: Array) -> Array:
  """x0 = sqrt(a-bar_t) x_t - sqrt(1 - a-bar_t) v."""
  return (_at(sched.sqrt_alphas_cumprod, t, xt.ndim) * xt
          - _at(sched.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v)


def eps_from_v(sched: Schedule, xt: Array, t: Array, v: Array) -> Array:
  """eps = sqrt(a-bar_t) v + sqrt(1 - a-bar_t) x_t."""
  return (_at(sched.sqrt_alphas_cumprod, t, xt.ndim) * v
          + _at(sched.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt)


def model_output_to_x0_eps(sched: Schedule, output: Array, xt: Array, t: Array,
                           parameterization: str = "eps") -> tuple[Array, Array]:
  """(x0, eps) predicted by a model output of the given parameterization ("eps"|"x0"|"v")."""
  return to_x0_eps(output, xt, _at(sched.sqrt_alphas_cumprod, t, xt.ndim),
                   _at(sched.sqrt_one_minus_alphas_cumprod, t, xt.ndim), parameterization)


def split_output(output: Array, learned_variance: bool) -> tuple[Array, Array | None]:
  """Splits a 2C-channel output into (prediction, variance values); (output, None) otherwise."""
  if not learned_variance:
    return output, None
  if output.shape[-1] % 2:
    raise ValueError(f"learned_variance needs an even channel count (2C), got output "
                     f"shape {output.shape}")
  return jnp.split(output, 2, axis=-1)


# ---------------------------------------------------------------- reverse process


class PMeanVar(NamedTuple):
  """p(x_{t-1} | x_t) = N(mean, variance) and the predictions it came from."""
  mean: Array
  variance: Array
  log_variance: Array
  pred_x0: Array
  pred_eps: Array


def p_mean_variance(sched: Schedule, model_output: Array, xt: Array, t: Array, *,
                    parameterization: str = "eps", learned_variance: bool = False,
                    clip_x0: float | None = None,
                    fixed_variance: str = "small") -> PMeanVar:
  """Mean and variance of p_theta(x_{t-1} | x_t) (DDPM eq. 1, 11; improved DDPM eq. 15).

  The mean is mu-tilde(x0_hat, x_t) (DDPM eq. 7) with x0_hat the (optionally clipped)
  predicted x0. The variance is:
    * learned_variance: log Sigma = f log beta_t + (1 - f) log beta-tilde_t with
      f = (v + 1) / 2 and v the second half of the output channels (improved DDPM eq. 15,
      v in [-1, 1], not clipped);
    * fixed_variance="small": beta-tilde_t (posterior, log clipped at i = 0);
    * fixed_variance="large": beta_t, with beta-tilde_1 at i = 0 (DDPM Sec. 3.2).

  Args:
    sched: the schedule; t indexes it.
    model_output: (B, ..., C) or (B, ..., 2C) with a learned variance.
    xt: (B, ..., C).
    t: int (B,) schedule indices.
    parameterization: what the (first C channels of the) output predicts.
    learned_variance: whether the output carries the variance values.
    clip_x0: clip x0_hat to [-clip_x0, clip_x0] (e.g. 1.0 for pixels), None for no clip.
    fixed_variance: "small" or "large", used when the variance is not learned.
  """
  out, var_values = split_output(model_output, learned_variance)
  nd = xt.ndim
  if var_values is not None:
    min_log = _at(sched.posterior_log_variance_clipped, t, nd)
    max_log = jnp.log(_at(sched.betas, t, nd))
    frac = (var_values + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
  elif fixed_variance == "small":
    log_var = jnp.broadcast_to(_at(sched.posterior_log_variance_clipped, t, nd), xt.shape)
  elif fixed_variance == "large":
    large = jnp.concatenate([sched.posterior_variance[1:2], sched.betas[1:]])
    log_var = jnp.broadcast_to(jnp.log(_at(large, t, nd)), xt.shape)
  else:
    raise ValueError(f"fixed_variance={fixed_variance!r}; expected 'small' or 'large'")
  sqrt_ab = _at(sched.sqrt_alphas_cumprod, t, nd)
  sqrt_1m_ab = _at(sched.sqrt_one_minus_alphas_cumprod, t, nd)
  x0, eps = to_x0_eps(out, xt, sqrt_ab, sqrt_1m_ab, parameterization)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = (xt - sqrt_ab * x0) / sqrt_1m_ab
  mean, _, _ = q_posterior(sched, x0, xt, t)
  return PMeanVar(mean, jnp.exp(log_var), log_var, x0, eps)


# ---------------------------------------------------------------- likelihood terms


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
  """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the DDPM codebase's choice."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array, *,
                                        cdf: str = "exact") -> Array:
  """Elementwise log-likelihood of 8-bit data in [-1, 1] under a discretized Gaussian.

  DDPM Sec. 3.3: bin [x - 1/255, x + 1/255], with the edge bins extended to -inf (x = -1)
  and +inf (x = 1). `cdf="exact"` (default) uses the erf-based jax.scipy.special.ndtr and
  log_ndtr and takes differences in the tail on the side where they do not cancel;
  `cdf="tanh"` reproduces the DDPM/improved-DDPM codebase's tanh approximation
  (absolute CDF error up to ~2e-4). Probabilities are floored at 1e-12.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (centered + 1.0 / 255.0)
  min_in = inv_stdv * (centered - 1.0 / 255.0)
  if cdf == "exact":
    log_cdf_plus = special.log_ndtr(plus_in)
    log_one_minus_cdf_min = special.log_ndtr(-min_in)
    # Phi(b) - Phi(a) == Phi(-a) - Phi(-b): use the lower tail where it is accurate.
    delta = jnp.where(min_in > 0, special.ndtr(-min_in) - special.ndtr(-plus_in),
                      special.ndtr(plus_in) - special.ndtr(min_in))
  elif cdf == "tanh":
    cdf_plus = approx_standard_normal_cdf(plus_in)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    delta = cdf_plus - cdf_min
  else:
    raise ValueError(f"cdf={cdf!r}; expected 'exact' or 'tanh'")
  log_delta = jnp.log(jnp.maximum(delta, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_terms(sched: Schedule, model_output: Array, x0: Array, xt: Array, t: Array, *,
              parameterization: str = "eps", learned_variance: bool = True,
              clip_x0: float | None = None, fixed_variance: str = "small",
              cdf: str = "exact", discrete_decoder: bool = True) -> Array:
  """Per-example variational bound term L_{t-1} in bits/dim (DDPM eq. 5; improved DDPM).

  For t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)). For t = 0: the decoder NLL
  -log p(x0 | x1) under `discretized_gaussian_log_likelihood`, which assumes 8-bit data
  in [-1, 1]; for continuous data such as latents pass `discrete_decoder=False` to use
  the KL term at t = 0 too (against q's variance clipped to beta-tilde_1). Both are
  means over the non-batch axes divided by log 2. Returns (B,).
  """
  true_mean, _, true_log_var = q_posterior(sched, x0, xt, t)
  p = p_mean_variance(sched, model_output, xt, t, parameterization=parameterization,
                      learned_variance=learned_variance, clip_x0=clip_x0,
                      fixed_variance=fixed_variance)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
  if not discrete_decoder:
    return kl
  nll = -_mean_flat(discretized_gaussian_log_likelihood(
      x0, p.mean, 0.5 * p.log_variance, cdf=cdf)) / math.log(2.0)
  return jnp.where(jnp.broadcast_to(t, kl.shape) == 0, nll, kl)


# ---------------------------------------------------------------- training losses


def loss_simple(sched: Schedule, model_output: Array, x0: Array, noise: Array, t: Array, *,
                parameterization: str = "eps", learned_variance: bool = False) -> Array:
  """L_simple: per-example MSE to the target eps, x0 or v (DDPM eq. 14). Returns (B,)."""
  out, _ = split_output(model_output, learned_variance)
  if parameterization == "eps":
    target = noise
  elif parameterization == "x0":
    target = x0
  elif parameterization == "v":
    target = v_from(sched, x0, t, noise)
  else:
    raise ValueError(f"parameterization={parameterization!r}; expected one of {PARAMETERIZATIONS}")
  return _mean_flat((out - target) ** 2)


def _vlb_variance_only(sched, model_output, x0, xt, t, parameterization, cdf,
                      discrete_decoder):
  """L_t with a stop-gradient on the mean half: it trains only the variance (IDDPM 3.1)."""
  out, var_values = split_output(model_output, True)
  frozen = jnp.concatenate([jax.lax.stop_gradient(out), var_values], axis=-1)
  return vlb_terms(sched, frozen, x0, xt, t, parameterization=parameterization,
                   learned_variance=True, cdf=cdf, discrete_decoder=discrete_decoder)


def hybrid_loss(sched: Schedule, model_output: Array, x0: Array, xt: Array, noise: Array,
                t: Array, *, parameterization: str = "eps", lambda_vlb: float = 0.001,
                cdf: str = "exact", discrete_decoder: bool = True) -> Array:
  """L_hybrid = L_simple + lambda L_vlb (improved DDPM Sec. 3.1; DiffusionDCI eq. 14).

  L_vlb = sum_t L_t is estimated per example as N * L_t (bits/dim) for the sampled t, so
  the added term is lambda * N * L_t; with N = 1000 and lambda = 0.001 this is the
  improved-DDPM code's `vb * num_timesteps / 1000`. The mean is stop-gradient inside
  L_vlb, so it trains only the learned variance. Needs a 2C-channel output. Returns (B,).
  """
  mse = loss_simple(sched, model_output, x0, noise, t, parameterization=parameterization,
                    learned_variance=True)
  vlb = _vlb_variance_only(sched, model_output, x0, xt, t, parameterization, cdf,
                          discrete_decoder)
  return mse + lambda_vlb * sched.num_timesteps * vlb


def training_losses(sched: Schedule, model_fn: Callable[[Array, Array, Any], Array],
                    x0: Array, rng: Array, *, parameterization: str = "eps",
                    learned_variance: bool = False, loss_type: str = "simple",
                    cond: Any = None, t: Array | None = None,
                    lambda_vlb: float = 0.001,
                    discrete_decoder: bool = True) -> dict[str, Array]:
  """Samples t ~ U{0..N-1} and eps ~ N(0, I), runs the model and returns the losses.

  Args:
    sched: the schedule; the model is called with the ORIGINAL timesteps
      `sched.timestep_map[t]`.
    model_fn: `model_fn(x_t, t_int32 (B,), cond) -> output`.
    x0: clean data (B, ..., C).
    rng: PRNG key.
    parameterization: "eps", "x0" or "v".
    learned_variance: the output has 2C channels (needed for "hybrid").
    loss_type: "simple" (L_simple) or "hybrid" (`hybrid_loss`).
    cond: any pytree passed to the model unchanged.
    t: optional fixed schedule indices (B,) instead of sampling them.
    lambda_vlb: lambda of the hybrid loss.
    discrete_decoder: see `vlb_terms` (False for continuous data such as latents).

  Returns:
    {"loss": (B,), "mse": (B,)} plus "vlb": (B,) (L_t in bits/dim) for "hybrid".
  """
  if loss_type not in ("simple", "hybrid"):
    raise ValueError(f"loss_type={loss_type!r}; expected 'simple' or 'hybrid'")
  if loss_type == "hybrid" and not learned_variance:
    raise ValueError("loss_type='hybrid' trains the variance: set learned_variance=True")
  t_key, noise_key = jax.random.split(rng)
  b = x0.shape[0]
  if t is None:
    t = jax.random.randint(t_key, (b,), 0, sched.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  xt = q_sample(sched, x0, t, noise)
  output = model_fn(xt, sched.timestep_map[t], cond).astype(jnp.float32)
  mse = loss_simple(sched, output, x0, noise, t, parameterization=parameterization,
                    learned_variance=learned_variance)
  if loss_type == "simple":
    return {"loss": mse, "mse": mse}
  vlb = _vlb_variance_only(sched, output, x0, xt, t, parameterization, "exact",
                          discrete_decoder)
  return {"loss": mse + lambda_vlb * sched.num_timesteps * vlb, "mse": mse, "vlb": vlb}


# ---------------------------------------------------------------- classifier-free guidance


def match_null(cond: Any, null_value: Any) -> Any:
  """`null_value` as a pytree like `cond`: itself, or one array/scalar copied to every leaf."""
  null_def = jax.tree.structure(null_value)
  if null_def == jax.tree.structure(cond):
    return null_value
  if not jax.tree_util.treedef_is_leaf(null_def) or null_value is None:
    raise ValueError(f"the null condition must be a pytree like the condition "
                     f"({jax.tree.structure(cond)}) or a single array, got {null_def}")
  return jax.tree.map(lambda _: null_value, cond)


def drop_condition(rng: Array, cond: Any, p_uncond: float, null_value: Any) -> tuple[Any, Array]:
  """Replaces the condition by a null value per example with probability p_uncond.

  Ho & Salimans 2022 (Alg. 1); DiffusionDCI drops the reference and the mask together, so
  one Bernoulli mask is shared by all leaves (call twice with two keys to drop
  independently).

  Args:
    rng: PRNG key.
    cond: a pytree whose leaves all have the leading batch axis B.
    p_uncond: drop probability.
    null_value: a pytree like `cond` or a single array/scalar used for every leaf;
      broadcast to each leaf's shape (e.g. 0.0, or a learned null embedding (D,)).

  Returns:
    (dropped cond, mask) with mask a bool (B,), True where the condition was dropped.
  """
  leaves = jax.tree.leaves(cond)
  if not leaves:
    raise ValueError("drop_condition needs a non-empty condition pytree")
  b = leaves[0].shape[0]
  mask = jax.random.bernoulli(rng, p_uncond, (b,))
  null_value = match_null(cond, null_value)

  def drop(leaf, null):
    if leaf.shape[0] != b:
      raise ValueError(f"every condition leaf needs batch axis {b}, got shape {leaf.shape}")
    null = jnp.broadcast_to(jnp.asarray(null, leaf.dtype), leaf.shape)
    return jnp.where(mask.reshape((b,) + (1,) * (leaf.ndim - 1)), null, leaf)

  return jax.tree.map(drop, cond, null_value), mask


def cfg_combine(eps_cond: Array, eps_uncond: Array, scale: float | Array) -> Array:
  """eps-hat = eps(x|y) + s (eps(x|y) - eps(x|null)) (DiffusionDCI eq. 17; Ho & Salimans 2022).

  s = 0 gives the conditional prediction (this is Ho & Salimans' w; their
  (1 + w) eps_c - w eps_u is the same expression).
  """
  return eps_cond + scale * (eps_cond - eps_uncond)
