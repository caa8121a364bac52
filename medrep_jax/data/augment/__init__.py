"""On-device (jit-compiled, batched) image augmentations.

`ops` holds single-image ops on float32 (H, W, C) images in [0, 1]; `policies`
composes them into the strong augmentation of DCL-CsTP, SimCLR / MoCo-v2 views,
CAMContrast's standard augmentation and its downstream augmentation (Table 2), and
batches them with per-example keys (`augment_batch`, `make_views`, and
`augment_labelled_batch`, which moves label maps with the image) so that they run inside
a jitted, sharded train step.
"""
from medrep_jax.data.augment.ops import (
    CROP_UNIFORMS, JITTER_UNIFORMS, autocontrast, brightness, color_jitter,
    color_jitter_from_uniform, contrast, crop_box_from_uniform, crop_resize, equalize, full_box,
    gaussian_blur, hflip, hue, poisson_from_uniform, poisson_noise, random_resized_crop, rotate,
    sample_crop_box, saturation, sharpness, solarize, to_grayscale)
from medrep_jax.data.augment.policies import (
    CROP_MODES, DOWNSTREAM_CONFIG_FIELDS, DOWNSTREAM_OFF, MOCO_JITTER, POLICIES,
    STRONG_CONFIG_FIELDS, STRONG_OPS, augment_batch, augment_labelled_batch, downstream_augment,
    downstream_kwargs, get_policy, make_views, policy_kwargs, random_subset_mask, simclr_augment,
    standard_augment, strong_augment)

__all__ = [
    "CROP_MODES", "CROP_UNIFORMS", "DOWNSTREAM_CONFIG_FIELDS", "DOWNSTREAM_OFF",
    "JITTER_UNIFORMS", "MOCO_JITTER", "POLICIES", "STRONG_CONFIG_FIELDS", "STRONG_OPS",
    "augment_batch", "augment_labelled_batch",
    "autocontrast", "brightness", "color_jitter", "color_jitter_from_uniform", "contrast",
    "crop_box_from_uniform", "crop_resize", "downstream_augment", "downstream_kwargs",
    "equalize", "full_box", "gaussian_blur", "get_policy",
    "hflip", "hue", "make_views", "poisson_from_uniform", "poisson_noise", "policy_kwargs",
    "random_resized_crop",
    "random_subset_mask", "rotate", "sample_crop_box", "saturation", "sharpness",
    "simclr_augment", "solarize", "standard_augment", "strong_augment", "to_grayscale",
]
