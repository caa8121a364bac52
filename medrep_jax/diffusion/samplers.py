"""DDPM ancestral and DDIM samplers, each one `jax.lax.scan`, with classifier-free guidance.

`model_fn(x, t, cond) -> output` is called with t an int32 array (B,) of ORIGINAL
timesteps (`sched.timestep_map`), never respaced indices; `cond` is any pytree (or None)
passed through unchanged.

The samplers are pure functions. Jit them with the static arguments marked, e.g.

    sample = jax.jit(functools.partial(ddim_sample, model_fn, sched, (8, 32, 32, 3),
                                       num_steps=50))
    x = sample(rng)

or use `make_sampler`, which takes `apply_fn(params, x, t, cond)` so the weights are a
jit argument rather than baked-in constants.

Randomness and sharding: rng is split into (k_init, k_steps); x_T = normal(k_init, shape)
and the noise of schedule index i is normal(fold_in(k_steps, i), shape), each drawn for
the whole batch at once. With threefry keys (the default) and
`jax_threefry_partitionable=True` (the default since JAX 0.5) these values do not depend
on how the batch is sharded, so a batch sharded over a ("data",) mesh gives the same
samples as one device. Pass `sharding=` (or a sharded `x_T`) to shard the batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from medrep_jax.diffusion import gaussian
from medrep_jax.diffusion.schedules import Schedule, space_timesteps

Array = jax.Array
ModelFn = Callable[[Array, Array, Any], Array]


def _is_zero(scale) -> bool:
  return isinstance(scale, (int, float)) and scale == 0


def guided_model_fn(model_fn: ModelFn, guidance_scale: float | Array, null_cond: Any,
                    learned_variance: bool = False) -> ModelFn:
  """Wraps `model_fn` with classifier-free guidance (Ho & Salimans 2022; DiffusionDCI eq. 17).

  The conditional and the null condition run in ONE model call on a 2B batch, and the
  outputs are combined with `cfg_combine`. With a learned variance only the prediction
  half is guided; the variance half is the conditional one. For x0 or v outputs the
  combination is applied to the raw output, which is the same as guiding eps because eps
  is affine in the output with a fixed x_t and the weights (1 + s, -s) sum to 1.

  `null_cond` is a pytree like `cond` (or one array/scalar for every leaf), broadcast to
  each leaf's shape.
  """
  if null_cond is None:
    raise ValueError("classifier-free guidance (guidance_scale != 0) needs null_cond")

  def fn(x, t, cond):
    if cond is None:
      raise ValueError("classifier-free guidance needs a condition, got cond=None")
    null = gaussian.match_null(cond, null_cond)
    both = jax.tree.map(
        lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)]),
        cond, null)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    out_c, out_u = jnp.split(out, 2, axis=0)
    pred_c, var_c = gaussian.split_output(out_c, learned_variance)
    pred_u, _ = gaussian.split_output(out_u, learned_variance)
    guided = gaussian.cfg_combine(pred_c, pred_u, guidance_scale)
    return guided if var_c is None else jnp.concatenate([guided, var_c], axis=-1)

  return fn


def _setup(model_fn, sched, shape, rng, *, guidance_scale, null_cond, learned_variance,
           x_T, t_start, sharding):
  """Shared sampler setup: the (guided) model, start index, initial x and step key."""
  n = sched.num_timesteps
  top = n - 1 if t_start is None else int(t_start)
  if not 0 <= top < n:
    raise ValueError(f"t_start={t_start} must be in [0, {n})")
  if t_start is not None and x_T is None:
    raise ValueError("t_start needs x_T: the input already noised to index t_start "
                     "(e.g. gaussian.q_sample(sched, x0, t_start, noise))")
  if x_T is None and shape is None:
    raise ValueError("give the sample shape or x_T")
  k_init, k_steps = jax.random.split(rng)
  if x_T is None:
    x = jax.random.normal(k_init, tuple(shape), jnp.float32)
  else:
    x = jnp.asarray(x_T, jnp.float32)
    if shape is not None and tuple(shape) != x.shape:
      raise ValueError(f"shape {tuple(shape)} does not match x_T shape {x.shape}")
  constrain = ((lambda y: jax.lax.with_sharding_constraint(y, sharding))
               if sharding is not None else (lambda y: y))
  if not _is_zero(guidance_scale):
    model_fn = guided_model_fn(model_fn, guidance_scale, null_cond, learned_variance)
  return model_fn, top, constrain(x), k_steps, constrain


def ddpm_sample(model_fn: ModelFn, sched: Schedule, shape: tuple[int, ...] | None,
                rng: Array, *, parameterization: str = "eps", learned_variance: bool = False,
                clip_x0: float | None = None, cond: Any = None,
                guidance_scale: float | Array = 0.0, null_cond: Any = None,
                x_T: Array | None = None, t_start: int | None = None,
                return_trajectory: bool = False, fixed_variance: str = "small",
                sharding: jax.sharding.Sharding | None = None):
  """Ancestral sampling x_{i-1} ~ p(x_{i-1} | x_i) (DDPM Alg. 2; improved DDPM eq. 15).

  Runs over every index of `sched` (pass a `respace`d schedule for fewer steps), from
  N - 1 down to 0, or from `t_start` when `x_T` is an input already noised to that index
  (SDEdit-style starts). No noise is added at index 0.

  Args:
    model_fn: `model_fn(x, t_original (B,) int32, cond) -> output`.
    sched: the schedule.
    shape: sample shape (B, ..., C); may be None when x_T is given. Static.
    rng: PRNG key.
    parameterization: "eps", "x0" or "v".
    learned_variance: the output has 2C channels (improved DDPM).
    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0]; None for no clipping.
    cond: condition pytree passed to the model.
    guidance_scale: s of classifier-free guidance; 0 disables it (one model call per step).
    null_cond: the null condition (needed when guidance_scale != 0).
    x_T: optional start (B, ..., C) at index N - 1, or at `t_start`.
    t_start: optional start index (static).
    return_trajectory: also return x after every step, (steps, B, ..., C).
    fixed_variance: "small" or "large" when the variance is not learned.
    sharding: optional sharding of the batch (e.g. NamedSharding(mesh, P("data"))).

  Returns:
    x_0 (B, ..., C), or (x_0, trajectory) when return_trajectory.
  """
  model_fn, top, x, k_steps, constrain = _setup(
      model_fn, sched, shape, rng, guidance_scale=guidance_scale, null_cond=null_cond,
      learned_variance=learned_variance, x_T=x_T, t_start=t_start, sharding=sharding)
  b = x.shape[0]

  def step(x, i):
    t = jnp.full((b,), i, jnp.int32)
    out = model_fn(x, sched.timestep_map[t], cond).astype(jnp.float32)
    p = gaussian.p_mean_variance(sched, out, x, t, parameterization=parameterization,
                                 learned_variance=learned_variance, clip_x0=clip_x0,
                                 fixed_variance=fixed_variance)
    noise = jax.random.normal(jax.random.fold_in(k_steps, i), x.shape, jnp.float32)
    scale = jnp.where(i > 0, jnp.exp(0.5 * p.log_variance), 0.0)
    x = constrain(p.mean + scale * noise)
    return x, (x if return_trajectory else None)

  x, traj = jax.lax.scan(step, x, jnp.arange(top, -1, -1, dtype=jnp.int32))
  return (x, traj) if return_trajectory else x


def ddim_sample(model_fn: ModelFn, sched: Schedule, shape: tuple[int, ...] | None,
                rng: Array, *, num_steps: int = 50, eta: float | Array = 0.0,
                parameterization: str = "eps", learned_variance: bool = False,
                clip_x0: float | None = None, cond: Any = None,
                guidance_scale: float | Array = 0.0, null_cond: Any = None,
                x_T: Array | None = None, t_start: int | None = None,
                return_trajectory: bool = False,
                sharding: jax.sharding.Sharding | None = None):
  """DDIM sampling (Song et al. 2021, eq. 12) on `num_steps` evenly spaced indices.

  The kept indices are round(linspace(0, top, num_steps)) with top = N - 1 or `t_start`,
  so the first step starts from the noisiest kept state. Each step:
    x0, eps = predictions (x0 clipped if asked, eps recomputed from it),
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev),
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
  with a = a-bar of the current kept index and a_prev that of the previous kept index
  (1 after the last), so the final step returns x0. eta = 0 is deterministic given x_T;
  eta = 1 is DDPM-like. A learned-variance half of the output is ignored.

  Args are as in `ddpm_sample`, plus num_steps (static) and eta.
  """
  model_fn, top, x, k_steps, constrain = _setup(
      model_fn, sched, shape, rng, guidance_scale=guidance_scale, null_cond=null_cond,
      learned_variance=learned_variance, x_T=x_T, t_start=t_start, sharding=sharding)
  b = x.shape[0]
  idx = jnp.asarray(space_timesteps(top + 1, num_steps), jnp.int32)
  sqrt_ab = sched.sqrt_alphas_cumprod[idx]
  sqrt_1m_ab = sched.sqrt_one_minus_alphas_cumprod[idx]
  sqrt_ab_prev = jnp.concatenate([jnp.ones((1,)), sqrt_ab[:-1]])
  sqrt_1m_ab_prev = jnp.concatenate([jnp.zeros((1,)), sqrt_1m_ab[:-1]])
  stochastic = not _is_zero(eta)

  def step(x, inp):
    i, s_ab, s_1m, s_ab_p, s_1m_p = inp
    t = jnp.full((b,), sched.timestep_map[i], jnp.int32)
    out = model_fn(x, t, cond).astype(jnp.float32)
    out, _ = gaussian.split_output(out, learned_variance)
    x0, eps = gaussian.to_x0_eps(out, x, s_ab, s_1m, parameterization)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x - s_ab * x0) / s_1m
    if stochastic:
      # sigma^2 = eta^2 (1 - a_prev)/(1 - a) (1 - a/a_prev), from the sqrt tables.
      ratio = (s_ab / s_ab_p) ** 2
      sigma = eta * (s_1m_p / s_1m) * jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0))
      noise = jax.random.normal(jax.random.fold_in(k_steps, i), x.shape, jnp.float32)
    else:
      sigma, noise = 0.0, 0.0
    dir_coef = jnp.sqrt(jnp.maximum(s_1m_p ** 2 - sigma ** 2, 0.0))
    x = constrain(s_ab_p * x0 + dir_coef * eps + sigma * noise)
    return x, (x if return_trajectory else None)

  xs = tuple(a[::-1] for a in (idx, sqrt_ab, sqrt_1m_ab, sqrt_ab_prev, sqrt_1m_ab_prev))
  x, traj = jax.lax.scan(step, x, xs)
  return (x, traj) if return_trajectory else x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def make_sampler(apply_fn: Callable[[Any, Array, Array, Any], Array], sched: Schedule,
                 shape: tuple[int, ...] | None, *, sampler: str = "ddim",
                 **kwargs) -> Callable[..., Array]:
  """A jitted `sample(params, rng, cond=None, null_cond=None, x_T=None)`.

  Args:
    apply_fn: `apply_fn(params, x, t, cond) -> output` (e.g. a closure over
      `module.apply`); params are a traced argument, not compiled-in constants.
    sched: the schedule (compiled in as constants; it is small).
    shape: the sample shape, or None to take it from x_T.
    sampler: "ddpm" or "ddim".
    **kwargs: the sampler's keyword arguments (num_steps, eta, parameterization,
      learned_variance, clip_x0, guidance_scale, null_cond default, t_start, sharding, ...).

  One compilation per distinct (shapes, dtypes, shardings) of the arguments; the model is
  traced once per compilation because the loop is a single scan.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}; expected one of {sorted(SAMPLERS)}")
  default_null = kwargs.pop("null_cond", None)
  base = functools.partial(SAMPLERS[sampler], sched=sched, shape=shape, **kwargs)

  def sample(params, rng, cond=None, null_cond=None, x_T=None):
    model_fn = lambda x, t, c: apply_fn(params, x, t, c)
    return base(model_fn, rng=rng, cond=cond, x_T=x_T,
                null_cond=default_null if null_cond is None else null_cond)

  return jax.jit(sample)
