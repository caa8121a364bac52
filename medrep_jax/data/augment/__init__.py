"""On-device (jit-compiled, batched) image augmentations.

`ops` holds single-image ops on float32 (H, W, C) images in [0, 1]; `policies`
composes them into the strong augmentation of DCL-CsTP, SimCLR / MoCo-v2 views,
CAMContrast's standard augmentation and its downstream augmentation (Table 2), and
batches them with per-example keys (`augment_batch`, `make_views`, and
`augment_labelled_batch`, which moves label maps with the image) so that they run inside
a jitted, sharded train step. `volume` holds the (D, H, W, C) volume ops behind the
"standard3d" policy, CAMContrast's standard augmentation on volumes (Sec. 4.7), and
`augment_batch` / `make_views` take volume batches (B, D, H, W, C) too.
"""
from medrep_jax.data.augment.ops import (
    CROP_UNIFORMS, JITTER_UNIFORMS, autocontrast, brightness, color_jitter,
    color_jitter_from_uniform, contrast, crop_box_from_uniform, crop_resize, equalize, full_box,
    gaussian_blur, hflip, hue, poisson_from_uniform, poisson_noise, random_resized_crop, rotate,
    sample_crop_box, saturation, sharpness, solarize, to_grayscale)
from medrep_jax.data.augment.policies import (
    CROP_MODES, DOWNSTREAM_CONFIG_FIELDS, DOWNSTREAM_OFF, MOCO_JITTER, POLICIES,
    STRONG_CONFIG_FIELDS, STRONG_OPS, augment_batch, augment_labelled_batch, downstream_augment,
    downstream_kwargs, get_policy, make_views, no_augment, policy_kwargs, random_subset_mask,
    simclr_augment, standard3d_augment, standard_augment, strong_augment)
from medrep_jax.data.augment.volume import (
    CROP3D_UNIFORMS, color_jitter_volume_from_uniform, contrast_volume, crop_box3d_from_uniform,
    crop_resize_volume, flip_volume, full_box3d, rotate_volume)

__all__ = [
    "CROP3D_UNIFORMS", "CROP_MODES", "CROP_UNIFORMS", "DOWNSTREAM_CONFIG_FIELDS",
    "DOWNSTREAM_OFF", "JITTER_UNIFORMS", "MOCO_JITTER", "POLICIES", "STRONG_CONFIG_FIELDS",
    "STRONG_OPS", "augment_batch", "augment_labelled_batch", "autocontrast", "brightness",
    "color_jitter", "color_jitter_from_uniform", "color_jitter_volume_from_uniform",
    "contrast", "contrast_volume", "crop_box3d_from_uniform", "crop_box_from_uniform",
    "crop_resize", "crop_resize_volume", "downstream_augment", "downstream_kwargs", "equalize",
    "flip_volume", "full_box", "full_box3d", "gaussian_blur", "get_policy", "hflip", "hue",
    "make_views", "no_augment", "poisson_from_uniform", "poisson_noise", "policy_kwargs",
    "random_resized_crop", "random_subset_mask", "rotate", "rotate_volume", "sample_crop_box",
    "saturation", "sharpness", "simclr_augment", "solarize", "standard3d_augment",
    "standard_augment", "strong_augment", "to_grayscale",
]
