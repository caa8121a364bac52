"""Beta schedules, the precomputed `Schedule` pytree, and timestep respacing.

Schedules are computed in float64 NumPy and stored as float32 `jnp` arrays, so the
quantities derived from products of many (1 - beta) factors keep their precision.

Index convention: `Schedule` arrays are indexed by i = 0..N-1. For a full schedule
i is the timestep t (DDPM's t = i + 1). After `respace`, i indexes the kept subsequence
and `timestep_map[i]` is the ORIGINAL timestep, which is what models are conditioned on.

`respace` and `make_schedule` run NumPy on concrete arrays: call them outside `jax.jit`
(once, at setup). The resulting `Schedule` is a pytree and can be passed into jitted code.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULES = ("linear", "scaled_linear", "cosine")


class Schedule(struct.PyTreeNode):
  """Precomputed diffusion constants (Ho et al. 2020, eqs. 4, 6-7), float32 arrays (N,).

  Attributes:
    betas: beta_t.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha-bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha-bar_{t-1} (1 at i = 0).
    sqrt_alphas_cumprod: sqrt(alpha-bar_t).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha-bar_t).
    log_one_minus_alphas_cumprod: log(1 - alpha-bar_t).
    sqrt_recip_alphas_cumprod: 1 / sqrt(alpha-bar_t).
    sqrt_recipm1_alphas_cumprod: sqrt(1 / alpha-bar_t - 1).
    posterior_variance: beta-tilde_t = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) (eq. 7).
    posterior_log_variance_clipped: log beta-tilde_t with the 0 at i = 0 replaced by
      beta-tilde at i = 1.
    posterior_mean_coef1: coefficient of x0 in mu-tilde_t (eq. 7).
    posterior_mean_coef2: coefficient of x_t in mu-tilde_t (eq. 7).
    timestep_map: int32 original timestep of each index (identity unless respaced).
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timestep_map: jax.Array

  @property
  def num_timesteps(self) -> int:
    """N, the number of steps (static: it is an array shape)."""
    return self.betas.shape[0]

  T = num_timesteps


def cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
  """f(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for t in [0, 1] (Nichol & Dhariwal eq. 17)."""
  return np.cos((np.asarray(t, np.float64) + s) / (1 + s) * math.pi / 2) ** 2


def beta_schedule(name: str, T: int) -> np.ndarray:
  """Float64 betas (T,) for a named schedule.

  Args:
    name: "linear" (Ho et al. 2020: 1e-4..0.02 at T = 1000, both ends scaled by 1000/T as
      in improved DDPM so that other T give the same alpha-bar_T), "scaled_linear" (LDM:
      sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012), squared) or "cosine"
      (Nichol & Dhariwal 2021 eq. 17, s = 0.008, betas clipped at 0.999).
    T: number of diffusion steps.
  """
  if T < 2:
    raise ValueError(f"a diffusion schedule needs T >= 2 steps, got T={T}")
  if name == "linear":
    scale = 1000.0 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
  if name == "scaled_linear":
    return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
  if name == "cosine":
    f = cosine_alpha_bar(np.arange(T + 1) / T)
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
  raise ValueError(f"unknown beta schedule {name!r}; expected one of {SCHEDULES}")


def schedule_from_betas(betas: np.ndarray,
                        timestep_map: np.ndarray | None = None) -> Schedule:
  """Builds a `Schedule` from betas (computed in float64, stored as float32)."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas.shape}")
  if np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError("betas must lie in (0, 1]")
  n = betas.shape[0]
  if timestep_map is None:
    timestep_map = np.arange(n)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(ac),
      alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      log_one_minus_alphas_cumprod=f32(np.log(1.0 - ac)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(np.log(np.append(post_var[1], post_var[1:]))),
      posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
      timestep_map=jnp.asarray(timestep_map, jnp.int32),
  )


def make_schedule(name: str = "linear", T: int = 1000) -> Schedule:
  """The `Schedule` of a named beta schedule with T steps (see `beta_schedule`)."""
  return schedule_from_betas(beta_schedule(name, T))


def space_timesteps(T: int, n: int | str) -> np.ndarray:
  """Evenly spaced timesteps to keep out of T, ascending int array.

  Args:
    T: number of timesteps of the original schedule.
    n: an int or a decimal string, "N": N timesteps round(linspace(0, T - 1, N)), which
      always keep 0 and T - 1 (the first DDIM step starts from the noisiest x_{T-1});
      or "ddimN": improved DDPM's convention range(0, T, stride) with the integer
      stride that gives exactly N steps (the last kept step may be below T - 1).
  """
  if isinstance(n, str) and n.startswith("ddim"):
    want = int(n[len("ddim"):])
    for stride in range(1, T + 1):
      if len(range(0, T, stride)) == want:
        return np.arange(0, T, stride)
    raise ValueError(f"cannot make {want} equally strided steps out of T={T}")
  n = int(n)
  if not 1 <= n <= T:
    raise ValueError(f"cannot keep {n} of T={T} timesteps; need 1 <= n <= T")
  if n == 1:
    return np.array([T - 1])
  return np.round(np.linspace(0, T - 1, n)).astype(np.int64)


def respace(schedule: Schedule, timesteps: Sequence[int]) -> tuple[Schedule, np.ndarray]:
  """Keeps a subsequence of timesteps (improved DDPM, Nichol & Dhariwal 2021 Sec. 4).

  The kept alpha-bar's are unchanged and the betas are recomputed from them:
  beta_i = 1 - alpha-bar_{S_i} / alpha-bar_{S_{i-1}}, so q(x_t | x_0) at each kept step is
  exactly the original one. Works on an already respaced schedule (maps compose).

  Args:
    schedule: a concrete (not traced) `Schedule`.
    timesteps: indices of `schedule` to keep (sorted and de-duplicated here).

  Returns:
    (respaced schedule, timestep_map) where timestep_map[i] is the ORIGINAL timestep of
    the new index i (also stored as `schedule.timestep_map`).
  """
  try:
    betas = np.asarray(schedule.betas, np.float64)
    old_map = np.asarray(schedule.timestep_map)
  except jax.errors.TracerArrayConversionError as e:
    raise ValueError("respace needs a concrete Schedule: call it outside jax.jit") from e
  kept = np.unique(np.asarray(timesteps, np.int64))
  n = betas.shape[0]
  if kept.size < 2 or kept[0] < 0 or kept[-1] >= n:
    raise ValueError(f"respace needs >= 2 timesteps in [0, {n}), got {list(timesteps)}")
  ac = np.cumprod(1.0 - betas)[kept]
  new_betas = 1.0 - ac / np.append(1.0, ac[:-1])
  timestep_map = old_map[kept]
  return schedule_from_betas(new_betas, timestep_map), timestep_map
