"""Class activation maps and the heatmap encoder of CAMContrast (Yap & Ng, Sec. 3).

* ``class_activation_maps``: eq. 1, M^c(x) = Σ_i w_i^c F_i(x), the class-weighted sum of
  the last feature maps that precede the GAP layer of a classifier.
* ``unweighted_maps``: the Σ_i F_i(x) of the "unweighted heatmaps" ablation (Table 4).
* ``cams_from_variables``: eq. 1 on any trained classifier of this library whose
  parameters hold an ``encoder`` subtree and a linear ``head`` on the pooled features
  (``models.unet.Classifier``, ``methods.finetune.FinetuneNet``, the CAMContrast stage-1
  classifier).
* ``minmax_normalize``: the per-image min-max normalization that turns CAMs into
  heatmaps in [0, 1] (Sec. 3.1), kept at feature-map resolution.
* ``HeatmapEncoder``: f_h of Sec. 4.2, three 3x3 conv + ReLU layers, then GAP.

CAMs are float32 (B, h, w, K) arrays: one channel per class, on the grid of the last
feature map. Every function here also takes volumes, (B, d, h, w, K) feature maps and
heatmaps, with the same equations (the 3D CAMs of Sec. 4.7: M^c = Σ_i w_i^c F_i on the
last 3-D feature grid, normalized per volume).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax.models.resnet import global_pool, window
from medrep_jax.models.unet import last_feature_map

_HIGHEST = jax.lax.Precision.HIGHEST
# einsum letters of the spatial axes, by rank of a (B, *spatial, C) map.
_SPATIAL = {4: "hw", 5: "dhw"}


def _check_maps(maps: Any, what: str, shape: str = "K") -> str:
  """The spatial einsum letters of (B, h, w, C) or (B, d, h, w, C) `maps`; else ValueError."""
  if maps.ndim not in _SPATIAL:
    raise ValueError(f"{what} must be (B, h, w, {shape}) or (B, d, h, w, {shape}), got shape "
                     f"{maps.shape}")
  return _SPATIAL[maps.ndim]


def class_activation_maps(feature_map: jax.Array, kernel: jax.Array) -> jax.Array:
  """M^c = Σ_i w_i^c F_i (eq. 1) for every class c.

  The bias of the linear layer is not part of a CAM (it does not depend on position);
  with it, the spatial mean of M^c plus the bias equals the logit of class c.

  Args:
    feature_map: (B, h, w, K) last feature maps F_i (K = number of feature maps), or
      (B, d, h, w, K) for a 3-D encoder (Sec. 4.7).
    kernel: (K, C) weights w_i^c of the linear layer on the GAP of `feature_map`.

  Returns:
    (B, h, w, C) (or (B, d, h, w, C)) float32 class activation maps.

  Raises:
    ValueError: when the shapes do not fit together.
  """
  s = _check_maps(feature_map, "feature_map")
  if kernel.ndim != 2 or kernel.shape[0] != feature_map.shape[-1]:
    raise ValueError(f"kernel must be (K={feature_map.shape[-1]}, num_classes) to match the "
                     f"feature maps, got shape {kernel.shape}")
  return jnp.einsum(f"b{s}k,kc->b{s}c", feature_map.astype(jnp.float32),
                    kernel.astype(jnp.float32), precision=_HIGHEST)


def unweighted_maps(feature_map: jax.Array) -> jax.Array:
  """Σ_i F_i: the class-agnostic sum of the feature maps (Table 4, "unweighted"), (B, h, w, 1)
  (or (B, d, h, w, 1) for volumes)."""
  _check_maps(feature_map, "feature_map")
  return jnp.sum(feature_map.astype(jnp.float32), axis=-1, keepdims=True)


def minmax_normalize(maps: Any, eps: float = 1e-8) -> Any:
  """(M − min M) / (max M − min M) over the spatial axes, per image (volume) and channel.

  A constant map (max == min) becomes all zeros. NumPy input stays NumPy (host-side
  heatmap generation, no device round trip); jax input (e.g. inside a loss) stays jax.

  Args:
    maps: (B, h, w, C) maps, or (B, d, h, w, C) 3-D maps (normalized per volume).
    eps: a range at or below eps counts as constant.

  Returns:
    float32 maps in [0, 1], shaped as `maps`.
  """
  xp = np if isinstance(maps, np.ndarray) else jnp
  axes = tuple(range(1, len(_check_maps(maps, "maps", "C")) + 1))
  maps = maps.astype(xp.float32)
  lo = xp.min(maps, axis=axes, keepdims=True)
  span = xp.max(maps, axis=axes, keepdims=True) - lo
  return xp.where(span > eps, (maps - lo) / xp.maximum(span, eps), 0.0).astype(xp.float32)


def _sub_variables(variables: Mapping[str, Any], name: str) -> dict:
  """`{collection: tree[name]}` for every collection that has a `name` subtree."""
  out = {col: tree[name] for col, tree in variables.items()
         if isinstance(tree, Mapping) and name in tree}
  if "params" not in out:
    raise ValueError(f"variables have no params[{name!r}] subtree; a CAM needs a classifier "
                     f"with an 'encoder' and a linear 'head' on its pooled features, got "
                     f"params keys {sorted(variables.get('params', {}))}")
  return out


def cams_from_variables(encoder: nn.Module, variables: Mapping[str, Any],
                        images: jax.Array, weighted: bool = True
                        ) -> tuple[jax.Array, jax.Array]:
  """Logits and eq. 1 CAMs of a trained encoder + GAP + linear-head classifier.

  Args:
    encoder: the classifier's encoder module (unbound), returning a features dict.
    variables: the classifier's variables, with `params["encoder"]`,
      `params["head"]["kernel"]` (K, C) and `params["head"]["bias"]` (and, if any,
      `batch_stats["encoder"]`).
    images: (B, H, W, channels) inputs in the classifier's input range, or
      (B, D, H, W, channels) volumes for a 3-D encoder (Sec. 4.7).
    weighted: False gives the unweighted maps of Table 4 (one channel).

  Returns:
    (logits (B, C), maps (B, h, w, C) or (B, h, w, 1)), both float32 (maps on the
    (d, h, w) grid for volumes); the encoder runs in inference mode.
  """
  head = _sub_variables(variables, "head")["params"]
  feats = encoder.apply(_sub_variables(variables, "encoder"), images, train=False)
  fmap = last_feature_map(feats)
  pooled = feats["pooled"].astype(jnp.float32)
  logits = jnp.dot(pooled, head["kernel"], precision=_HIGHEST) + head["bias"]
  maps = class_activation_maps(fmap, head["kernel"]) if weighted else unweighted_maps(fmap)
  return logits, maps


class HeatmapEncoder(nn.Module):
  """f_h: three 3x3 conv + ReLU layers on a heatmap crop, then GAP (CAMContrast Sec. 4.2).

  The paper states the layer count and kernel size; the widths (and padding "SAME", so
  a 2x2 heatmap crop is valid) are our choice. On (B, d, h, w, 1) heatmap crops of
  volumes (Sec. 4.7) the convs are 3x3x3 and the GAP runs over d, h, w.

  Attributes:
    widths: output channels of the three convolutions.
    dtype: compute dtype; parameters are float32.

  ``__call__(heatmaps (B, h, w, 1) or (B, d, h, w, 1), train)`` returns
  ``{"c1": last map, "pooled": (B, D)}`` so that ``heads.MLPProjector`` (g_h) can take it
  like an image encoder's features.
  """
  widths: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, heatmaps: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    del train  # no normalization layers
    _check_maps(heatmaps, "heatmaps", "C")
    x = heatmaps.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, window(3, x), padding="SAME", dtype=self.dtype,
                          param_dtype=jnp.float32, name=f"conv{i + 1}")(x))
    return {"c1": x, "pooled": global_pool(x).astype(jnp.float32)}
