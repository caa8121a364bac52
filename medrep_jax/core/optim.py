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


def constant_linear_schedule(lr: float, num_steps: int,
                             constant_fraction: float) -> optax.Schedule:
  """`lr` for the first `constant_fraction` of `num_steps`, then linear to 0 at the end.

  DRFL (Sec. 4, "Experiment settings"): 60 epochs, the rate constant for 30, then decayed
  linearly to zero (pix2pix-style `maintain`/`decay` epochs), i.e. `constant_fraction=0.5`.
  """
  if not 0.0 <= constant_fraction <= 1.0:
    raise ValueError(f"optim.constant_fraction={constant_fraction}; expected a value in "
                     f"[0, 1] (the fraction of the steps at the full rate)")
  hold = int(round(constant_fraction * num_steps))
  decay = max(1, num_steps - hold)
  return optax.join_schedules([optax.constant_schedule(lr),
                               optax.linear_schedule(lr, 0.0, decay)], boundaries=[hold])


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """constant | cosine (with linear warmup) | step (piecewise-constant decay) |
  constant_linear (constant for `constant_fraction`, then linear to zero)."""
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
  elif name == "constant_linear":
    main = constant_linear_schedule(lr, max(1, num_steps - warmup),
                                    float(optim_cfg.get("constant_fraction", 0.5)))
  else:
    raise ValueError(f"optim.schedule={name!r}; expected constant, cosine, step or "
                     f"constant_linear")
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
  b1 = float(optim_cfg.get("b1", 0.9))  # Adam/AdamW first-moment decay
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd) if wd else optax.identity(),
        optax.sgd(schedule, momentum=float(optim_cfg.momentum) or None,
                  nesterov=bool(optim_cfg.get("nesterov", False))))
  elif name == "adam":
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.adam(schedule, b1=b1))
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=b1, weight_decay=wd)
  else:
    raise ValueError(f"optim.name={name!r}; expected sgd, adam or adamw")
  clip = float(optim_cfg.get("grad_clip", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx, schedule
