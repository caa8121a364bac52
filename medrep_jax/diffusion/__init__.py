"""The one diffusion core: schedules, Gaussian diffusion maths, losses and samplers.

Shared by `ldm`, `ltdiff` and `dsdm` (DESIGN.md, principle 1).
"""
from medrep_jax.diffusion.gaussian import (
    PMeanVar,
    cfg_combine,
    discretized_gaussian_log_likelihood,
    drop_condition,
    eps_from_v,
    hybrid_loss,
    loss_simple,
    model_output_to_x0_eps,
    normal_kl,
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    split_output,
    training_losses,
    v_from,
    vlb_terms,
    x0_from_v,
)
from medrep_jax.diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    guided_model_fn,
    make_sampler,
)
from medrep_jax.diffusion.schedules import (
    SCHEDULES,
    Schedule,
    beta_schedule,
    make_schedule,
    respace,
    schedule_from_betas,
    space_timesteps,
)
