"""Optimizers and learning-rate schedules from `config.optim` (optax).

Gradient accumulation (`optim.accumulate_steps = k`, default 1) wraps the optimizer in
`optax.MultiSteps`: each train step is one micro-step on a batch of `train.batch_size`; the
gradients of k consecutive micro-steps are averaged, and the parameters change only on every
k-th micro-step (the others apply zero updates). With a mean-reduced loss and no
batch-dependent layers, k micro-steps of batch B equal one step of batch k*B, so the
effective global batch is `k * train.batch_size`. What the accumulation does not cover:

- `train.num_steps` (and the trainer's `state.step`, logging and checkpoint periods) count
  micro-steps; the learning-rate schedule counts optimizer updates, `ceil(num_steps / k)`.
- A method's extras update on every micro-step: momentum encoders and EMA copies follow
  the (unchanged) parameters k times per update, and a memory bank enqueues every
  micro-batch. BatchNorm statistics come from each micro-batch of B.
- Gradient clipping and weight decay act on the averaged gradient, once per update.
"""
from __future__ import annotations

import logging
import math

import optax

log = logging.getLogger(__name__)


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


def accumulate_steps(optim_cfg) -> int:
  """`optim.accumulate_steps` (micro-steps per optimizer update), validated."""
  k = int(optim_cfg.get("accumulate_steps", 1))
  if k < 1:
    raise ValueError(f"optim.accumulate_steps={k}; expected an integer >= 1 (1: no "
                     f"gradient accumulation)")
  return k


def make_optimizer(optim_cfg, num_steps: int):
  """Builds the optax chain; returns (tx, schedule).

  Args:
    optim_cfg: `config.optim`.
    num_steps: train steps (micro-steps when `optim_cfg.accumulate_steps` > 1).

  Returns:
    The transformation, and the learning-rate schedule as a function of the optimizer
    update count (which is `step // accumulate_steps`).
  """
  k = accumulate_steps(optim_cfg)
  if k > 1 and num_steps % k:
    log.warning("train.num_steps=%d is not a multiple of optim.accumulate_steps=%d; the "
                "last %d micro-batches are accumulated but never applied", num_steps, k,
                num_steps % k)
  schedule = make_schedule(optim_cfg, math.ceil(num_steps / k))
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
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx, schedule
