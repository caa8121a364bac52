"""Single-volume augmentation ops on float32 (D, H, W, C) volumes in [0, 1].

CAMContrast's 3-D ADNI experiments (Yap & Ng, Sec. 4.7) keep "the pretraining and
fine-tuning pipeline" of the 2-D runs and change only the backbone, so the standard
augmentation (resized crop, horizontal flip, rotation, colour jitter) is carried over
to volumes. These ops are its 3-D parts; `policies.standard3d_augment` composes them.

Axes are (depth, height, width, channel): axis 0 is the slice axis (axial for
brain MRI), and every axial slice is an (H, W, C) image of the 2-D ops in `ops`,
which are reused wherever they apply to a volume (rotation per slice; brightness and
contrast on the whole volume). As in `ops`, magnitudes (boxes, angles, factors) may
be traced, while shapes, axes and fill modes are static, so one compiled program
serves every draw. C is in {1, 3} (the 2-D ops' rule); volumes are usually C = 1.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from medrep_jax.data.augment import ops

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
# Spatial axes of a (D, H, W, C) volume, by name (for `flip_volume`).
SPATIAL_AXES = {"d": 0, "h": 1, "w": 2}


def check_volume(vol: Array, where: str = "volume op") -> None:
  """Raises ValueError unless `vol` is one (D, H, W, C) volume with C in {1, 3}."""
  if vol.ndim != 4 or vol.shape[-1] not in (1, 3):
    raise ValueError(f"{where}: expected one (D, H, W, C) volume with C in {{1, 3}}, "
                     f"got shape {tuple(vol.shape)}; vmap over the batch axis")


def out_dhw(size: int | Sequence[int] | None, vol: Array) -> tuple[int, int, int]:
  """Static output (depth, height, width) of a volume op.

  None keeps the input size; an int n gives an n^3 cube; an (h, w) pair resizes the
  slices and keeps the depth (a 2-D config's image size); (d, h, w) is used as given.
  """
  d, h, w = (int(n) for n in vol.shape[:3])
  if size is None:
    return d, h, w
  if isinstance(size, int):
    return size, size, size
  size = tuple(int(n) for n in size)
  if len(size) == 2:
    return (d,) + size
  if len(size) != 3:
    raise ValueError(f"volume out_size must be an int, (h, w) or (d, h, w), got {size!r}")
  return size


# ----------------------------------------------------------------------------- geometry


def _axis(axis: int | str) -> int:
  axis = SPATIAL_AXES.get(axis, axis) if isinstance(axis, str) else axis
  if isinstance(axis, bool) or not isinstance(axis, int) or axis not in (0, 1, 2):
    raise ValueError(f"flip axis must be a spatial axis 0, 1, 2 or 'd', 'h', 'w'; got {axis!r}")
  return axis


def flip_volume(vol: Array, axis: int | str = "w") -> Array:
  """Mirrors the volume along one spatial axis (static): 0 / "d" reverses the slice
  order, 1 / "h" is an up-down and 2 / "w" a left-right flip of every slice (the 2-D
  horizontal flip, `ops.hflip`, the default). Equal to `np.flip(vol, axis)`."""
  check_volume(vol, "flip_volume")
  return jnp.flip(vol, _axis(axis))


def rotate_volume(vol: Array, degrees: Array | float, fill: str = "zero") -> Array:
  """Rotates every axial slice (D, :, :, :) by the same angle about its centre.

  This is `ops.rotate` (bilinear, counter-clockwise for positive `degrees` as
  np.rot90 on the (H, W) axes, corners filled per `fill`) mapped over the depth axis:
  the 2-D in-plane rotation of CAMContrast's standard augmentation carried over to
  volumes (CAMContrast Sec. 4.7). The depth axis is not mixed. `degrees=0` returns
  `vol` exactly.
  """
  check_volume(vol, "rotate_volume")
  return jax.vmap(lambda sl: ops.rotate(sl, degrees, fill))(vol)


# Uniforms used by `crop_box3d_from_uniform`: volume fraction and depth aspect, the
# in-plane box (`ops.crop_box_from_uniform`), then the depth offset.
CROP3D_UNIFORMS = 2 + ops.CROP_UNIFORMS + 1


def crop_box3d_from_uniform(u: Array, depth: int, height: int, width: int,
                            scale: tuple[Array | float, Array | float] = (0.8, 1.0),
                            ratio: tuple[Array | float, Array | float] = (3 / 4, 4 / 3)
                            ) -> Array:
  """3-D random-resized-crop box (d0, h0, w0, dd, hh, ww) from `CROP3D_UNIFORMS` uniforms.

  The 2-D rule of `ops.crop_box_from_uniform` extended by one axis:
    - the volume fraction s = dd hh ww / (D H W) is uniform in `scale`;
    - the depth aspect rho = (dd / D) / sqrt(hh ww / (H W)), the depth fraction over
      the in-plane side fraction, is log-uniform in `ratio`, the same rule as the
      in-plane aspect. It is relative to the volume's shape (not in voxels), so a
      thin stack (D << H) is cut about as much along depth as in-plane; with
      ratio = (1, 1) every side keeps the fraction s^(1/3);
    - so the depth fraction is f_d = s^(1/3) rho^(2/3), clipped to [s, 1] (then the
      in-plane area fraction f_a = s / f_d stays in [s, 1] and s is kept exactly);
    - the in-plane box is `ops.crop_box_from_uniform` with area fraction f_a and
      aspect (w / h, in pixels) log-uniform in `ratio`: its 10 tries redraw the aspect,
      and if none fits it falls back to the centre crop of the whole slice with the
      aspect clamped to `ratio` (torchvision's fallback; s is then larger);
    - the depth offset is uniform over the positions that keep the box inside.
  Like the 2-D box it is not rounded to whole voxels. With scale = ratio = (1, 1) on
  square slices the box is the whole volume.
  """
  lo_r = jnp.log(jnp.asarray(ratio[0], jnp.float32))
  hi_r = jnp.log(jnp.asarray(ratio[1], jnp.float32))
  s = scale[0] + (scale[1] - scale[0]) * u[0]
  rho = jnp.exp(lo_r + (hi_r - lo_r) * u[1])
  f_d = jnp.clip(jnp.cbrt(s) * jnp.cbrt(rho * rho), s, 1.0)
  f_a = s / f_d
  plane = ops.crop_box_from_uniform(u[2:2 + ops.CROP_UNIFORMS], height, width, (f_a, f_a), ratio)
  dd = f_d * depth
  d0 = u[2 + ops.CROP_UNIFORMS] * (depth - dd)
  return jnp.stack([d0, plane[0], plane[1], dd, plane[2], plane[3]]).astype(jnp.float32)


def full_box3d(depth: int, height: int, width: int) -> Array:
  """The box (d0, h0, w0, dd, hh, ww) covering the whole volume."""
  return jnp.array([0.0, 0.0, 0.0, depth, height, width], jnp.float32)


def crop_resize_volume(vol: Array, box: Array,
                       out_size: int | Sequence[int] | None = None) -> Array:
  """Resamples the box (d0, h0, w0, dd, hh, ww) of `vol` to `out_size` (see `out_dhw`).

  Trilinear and antialiased: `jax.image.scale_and_translate` over the three spatial
  axes, the 3-D form of `ops.crop_resize`. Along each axis output voxel i samples the
  input at start + (i + 1/2) * extent / n - 1/2 (voxel centres), interpolating linearly
  between input voxels with the edge voxels repeated; when shrinking (n < extent) the
  kernel widens by extent / n (antialiasing). An integer-aligned box resampled to its
  own size is plain slicing. The box may be traced, so any box compiles to one program.
  """
  check_volume(vol, "crop_resize_volume")
  size = out_dhw(out_size, vol)
  start, extent = box[:3], box[3:]
  scale = jnp.asarray(size, jnp.float32) / extent
  out = jax.image.scale_and_translate(vol, size + (vol.shape[-1],), (0, 1, 2), scale,
                                      -start * scale, method="linear", antialias=True,
                                      precision=_HIGHEST)
  return ops._clip(out)


# ----------------------------------------------------------------------------- intensity


def _as_image(vol: Array) -> Array:
  """The volume as one tall (D * H, W, C) image: whole-volume statistics for the 2-D ops."""
  d, h, w, c = vol.shape
  return vol.reshape(d * h, w, c)


def contrast_volume(vol: Array, factor: Array | float) -> Array:
  """Blends with the mean grey level of the whole volume (`ops.contrast` on all voxels):
  factor 0 gives a flat grey volume, 1 the volume. One factor and one mean for the
  whole volume, not per slice, so slices keep their relative intensities."""
  check_volume(vol, "contrast_volume")
  return ops.contrast(_as_image(vol), factor).reshape(vol.shape)


def color_jitter_volume_from_uniform(vol: Array, u: Array, brightness: Array | float = 0.4,
                                     contrast: Array | float = 0.4,
                                     saturation: Array | float = 0.0,
                                     hue: Array | float = 0.0) -> Array:
  """`ops.color_jitter_from_uniform` on the whole volume (`ops.JITTER_UNIFORMS` uniforms).

  Brightness factor uniform in [max(0, 1 - b), 1 + b], then contrast likewise against
  the mean grey level of all voxels (`contrast_volume`); saturation and hue (default 0)
  act only on C = 3 volumes, per voxel. One draw serves every slice, as the 2-D jitter
  of CAMContrast's standard augmentation carried over to volumes (Sec. 4.7).
  """
  check_volume(vol, "color_jitter_volume_from_uniform")
  out = ops.color_jitter_from_uniform(_as_image(vol), u, brightness, contrast, saturation, hue)
  return out.reshape(vol.shape)
