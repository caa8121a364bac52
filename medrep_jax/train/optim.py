"""Optimizers and learning-rate schedules from `config.optim` (optax)."""
from __future__ import annotations

import optax


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """constant | cosine (with linear warmup) | step (piecewise-constant decay)."""
  lr = float(optim_cfg.lr)
  warmup = int(round(float(optim_cfg.get("warmup_fraction", 0.0)) * num_steps))
  name = optim_cfg.schedule
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(1, num_steps - warmup))
  elif name == "step":
    # e.g. the dual-stream paper: lr x 0.1 at epochs 120 and 160 of 200 -> (0.6, 0.8).
    bounds = {int(f * num_steps) - warmup: float(optim_cfg.step_factor)
              for f in optim_cfg.step_boundaries}
    main = optax.piecewise_constant_schedule(lr, bounds)
  else:
    raise ValueError(f"optim.schedule={name!r}; expected constant, cosine or step")
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def make_optimizer(optim_cfg, num_steps: int):
  """Builds the optax chain; returns (tx, schedule)."""
  schedule = make_schedule(optim_cfg, num_steps)
  name = optim_cfg.name
  wd = float(optim_cfg.weight_decay)
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd) if wd else optax.identity(),
        optax.sgd(schedule, momentum=float(optim_cfg.momentum) or None,
                  nesterov=bool(optim_cfg.get("nesterov", False))))
  elif name == "adam":
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.adam(schedule))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd)
  else:
    raise ValueError(f"optim.name={name!r}; expected sgd, adam or adamw")
  clip = float(optim_cfg.get("grad_clip", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
