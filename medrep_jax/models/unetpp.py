"""UNet++ (Zhou et al., DLMIA 2018), the encoder-decoder of LTDiff++ (Sec. III-A1/2).

Node X_{i,j} sits at level i (resolution 1/2^i, width ``widths[i]``) and column j:

  X_{i,0} = H(D(X_{i-1,0}))                                  the encoder (D: 2x2 max-pool)
  X_{i,j} = H([X_{i,0}, ..., X_{i,j-1}, U(X_{i+1,j-1})])      j >= 1: nested dense skips

H is two 3x3 conv-norm-ReLU (``unet.ConvBlock``); U is a bilinear x2 resize or a 2x2
stride-2 transposed conv to ``widths[i]`` (``upsample``, the options of
``unet.UNetDecoder``), one per node. So X_{i,j} concatenates j + 1 inputs. LTDiff++
prints "{U(X_{i+1,j-1})}_{k=0}^{j-1}"; the k-indexed set belongs to X_{i,k}
(``shared/specs/ltdiff.md``). Depth d = len(widths), 5 with widths 32..512 in UNet++.

Heads (Sec. III-A3): a 1x1 conv on each X_{0,j}, j = 1..d-1, with ``deep_supervision``,
else on X_{0,d-1} alone; parameters "head_j" in both cases. ``prune_level=L`` (UNet++
"model pruning", LTDiff++ Sec. III-A1) runs only the nodes with i + j <= L and returns
head L; it shares every parameter with the full network, so a model trained with all
heads prunes at inference. Initialise without ``prune_level`` (a pruned init makes a
partial tree).

Latent (DESIGN's reading of "one-dimensional latent vectors"): the bottleneck X_{d-1,0}
as a spatial map, optionally a linear 1x1 conv to ``latent_channels`` ("to_latent") that
the decoder maps back to ``widths[-1]`` ("from_latent"); ``__call__`` takes the same path,
so ``decode(*encode(x))`` equals ``__call__(x)``.

``skip_mode`` ("skip connections on or off", the LTDiff++ ablation):
  "source": the decoder's column 0 is the input's encoder features X_{i,0}.
  "none":   decode uses no encoder feature of the input. Column 0 is regenerated from the
            latent by an upsampling path ("gen_i"): X'_{d-1,0} = the decoded bottleneck,
            X'_{i,0} = H(U(X'_{i+1,0})) (a plain U-Net decoder without skips); the nested
            nodes and heads then run unchanged on X'. decode(latent, skips) ignores
            ``skips``, so no texture of the input can leak past the latent.
With "source", pruning below d-1 needs no bottleneck at all (X_{0,L} depends on X_{0..L,0}
only); with "none" every head depends on the latent.

Parameters are float32; convs run in ``dtype``; heads and the latent are float32.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from medrep_jax.models.conv_transpose import ConvTranspose2x
from medrep_jax.models.resnet import Dtype
from medrep_jax.models.unet import ConvBlock, UNetEncoder, resize

SKIP_MODES = ("source", "none")
UPSAMPLES = ("bilinear", "transpose")
Heads = jnp.ndarray | list[jnp.ndarray]


class _Encoder(UNetEncoder):
  """``unet.UNetEncoder`` (same parameter tree, "level1".."levelN") returning the list
  X_{0,0}..X_{N-1,0}, or only its first ``levels`` entries (pruned inference)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool,
               levels: int | None = None) -> list[jnp.ndarray]:
    block = nn.remat(ConvBlock, static_argnums=(2,)) if self.remat else ConvBlock
    x, feats = x.astype(self.dtype), []
    for i, w in enumerate(self.widths[:levels]):
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = block(w, self.norm, dtype=self.dtype, name=f"level{i + 1}")(x, train)
      feats.append(x)
    return feats


class UNetPlusPlus(nn.Module):
  """UNet++ with deep supervision, pruning and an encode/decode split (module docstring).

  Attributes:
    out_channels: channels of every head (1 for a CT slice or a binary mask).
    widths: per-level widths, shallow to deep; depth d = len(widths) >= 2.
    norm: "batch", "group" or "none" (``resnet.make_norm``).
    deep_supervision: heads on X_{0,1..d-1} (a list) instead of X_{0,d-1} alone.
    latent_channels: 0 keeps X_{d-1,0} as the latent; c > 0 adds the 1x1 convs.
    skip_mode: "source" or "none".
    upsample: "bilinear" or "transpose".
    dtype: compute dtype.

  Methods (all through ``model.apply(variables, ..., method="encode")`` etc.):
    ``__call__(x, *, train, prune_level=None)`` -> heads; ``encode(x, *, train)`` ->
    (latent, skips); ``decode(latent, skips=None, *, train, prune_level=None)`` -> heads.
    Initialising with ``__call__`` or ``encode`` gives the full tree; with ``decode`` the
    decoder's part of it (no encoder: its input channels are unknown), same values.
  """
  out_channels: int
  widths: Sequence[int] = (32, 64, 128, 256, 512)
  norm: str = "batch"
  deep_supervision: bool = True
  latent_channels: int = 0
  skip_mode: str = "source"
  upsample: str = "bilinear"
  dtype: Dtype = jnp.float32

  @property
  def depth(self) -> int:
    return len(self.widths)

  def setup(self):
    d, w = self.depth, tuple(self.widths)
    if d < 2 or self.skip_mode not in SKIP_MODES or self.upsample not in UPSAMPLES:
      raise ValueError(f"UNetPlusPlus needs >= 2 widths, skip_mode in {SKIP_MODES} and "
                       f"upsample in {UPSAMPLES}; got widths={w}, "
                       f"skip_mode={self.skip_mode!r}, upsample={self.upsample!r}")
    block = lambda i: ConvBlock(w[i], self.norm, dtype=self.dtype)
    up = lambda i: ConvTranspose2x(w[i], 2, dtype=self.dtype)
    conv1x1 = lambda c: nn.Conv(c, (1, 1), dtype=self.dtype, param_dtype=jnp.float32)
    ij = [(i, j) for j in range(1, d) for i in range(d - j)]
    transpose = self.upsample == "transpose"
    self.encoder = _Encoder(w, self.norm, self.dtype)
    self.node = {f"{i}_{j}": block(i) for i, j in ij}
    self.up = {f"{i}_{j}": up(i) for i, j in ij} if transpose else {}
    heads = range(1, d) if self.deep_supervision else [d - 1]
    self.head = {str(j): conv1x1(self.out_channels) for j in heads}
    if self.latent_channels:
      self.to_latent, self.from_latent = conv1x1(self.latent_channels), conv1x1(w[-1])
    if self.skip_mode == "none":
      self.gen = {str(i): block(i) for i in range(d - 1)}
      self.gen_up = {str(i): up(i) for i in range(d - 1)} if transpose else {}

  # ------------------------------------------------------------------ checks
  def _level(self, prune_level: int | None) -> int:
    d = self.depth
    if prune_level is None:
      return d - 1
    if not 1 <= prune_level <= d - 1:
      raise ValueError(f"prune_level must be in 1..{d - 1} (depth {d}), got {prune_level}")
    if str(prune_level) not in self.head:
      raise ValueError(f"prune_level={prune_level} needs head {prune_level}: train with "
                       f"deep_supervision=True (this model has only head {d - 1})")
    return prune_level

  def _check_input(self, x: jnp.ndarray) -> None:
    f = 2 ** (self.depth - 1)
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f or not x.shape[1] * x.shape[2]:
      raise ValueError(f"UNetPlusPlus input must be (B, H, W, C) with H and W divisible by "
                       f"2^(depth-1) = {f} (depth {self.depth}); got shape {x.shape}")
    kernel = self.variables.get("params", {}).get("encoder", {}).get("level1", {}).get(
        "conv1", {}).get("kernel")
    if kernel is not None and kernel.shape[2] != x.shape[-1]:
      raise ValueError(f"UNetPlusPlus was initialised for {kernel.shape[2]} input channels, "
                       f"got input of shape {x.shape}")

  def _check_code(self, latent: jnp.ndarray, skips) -> tuple[jnp.ndarray, ...]:
    c, d, w = self.latent_channels or self.widths[-1], self.depth, self.widths
    if latent.ndim != 4 or latent.shape[-1] != c:
      raise ValueError(f"decode expects a latent (B, h, w, {c}), got shape {latent.shape}")
    if self.skip_mode == "none":
      return ()
    b, h, wd = latent.shape[:3]
    want = [(b, h * 2 ** (d - 1 - i), wd * 2 ** (d - 1 - i), w[i]) for i in range(d - 1)]
    got = None if skips is None else [tuple(s.shape) for s in skips]
    if got != want:
      raise ValueError(f"skip_mode='source' decode needs skips X_(i,0) of shapes {want} "
                       f"for latent {latent.shape}, got {got}")
    return tuple(skips)

  # ------------------------------------------------------------------ graph
  def _up(self, x: jnp.ndarray, ups: dict, key: str, hw: tuple[int, int]) -> jnp.ndarray:
    return ups[key](x) if ups else resize(x, hw)

  def _nested(self, cols: list[jnp.ndarray], train: bool) -> list[jnp.ndarray]:
    """X_{0,1..L} from column 0, X_{0..L,0} (L = len(cols) - 1): the nodes i + j <= L."""
    x = {(i, 0): c.astype(self.dtype) for i, c in enumerate(cols)}
    level = len(cols) - 1
    for j in range(1, level + 1):
      for i in range(level + 1 - j):
        key = f"{i}_{j}"
        u = self._up(x[i + 1, j - 1], self.up, key, x[i, 0].shape[1:3])
        inputs = [x[i, k] for k in range(j)] + [u.astype(self.dtype)]
        x[i, j] = self.node[key](jnp.concatenate(inputs, -1), train)
    return [x[0, j] for j in range(1, level + 1)]

  def _heads(self, top: list[jnp.ndarray], prune_level: int | None) -> Heads:
    if prune_level is not None or not self.deep_supervision:
      return self.head[str(len(top))](top[-1]).astype(jnp.float32)
    return [self.head[str(j)](t).astype(jnp.float32) for j, t in enumerate(top, 1)]

  def _generate(self, bottom: jnp.ndarray, train: bool) -> list[jnp.ndarray]:
    """skip_mode="none": column 0 from the bottleneck alone, X'_{i,0} = H(U(X'_{i+1,0}))."""
    cols = [bottom.astype(self.dtype)]
    for i in range(self.depth - 2, -1, -1):
      hw = (2 * cols[0].shape[1], 2 * cols[0].shape[2])
      cols.insert(0, self.gen[str(i)](self._up(cols[0], self.gen_up, str(i), hw), train))
    return cols

  def _encode(self, x: jnp.ndarray, train: bool):
    self._check_input(x)
    feats = self.encoder(x, train)
    latent = self.to_latent(feats[-1]) if self.latent_channels else feats[-1]
    return latent.astype(jnp.float32), tuple(feats[:-1])

  # ------------------------------------------------------------------ public
  def encode(self, x: jnp.ndarray, *, train: bool):
    """(latent (B, H/2^(d-1), W/2^(d-1), latent_channels or widths[-1]) float32,
    skips = (X_{0,0}, ..., X_{d-2,0})) for images x (B, H, W, C)."""
    latent, skips = self._encode(x, train)
    if self.is_initializing():  # create the decoder's parameters too: one tree
      self.decode(latent, skips, train=train)
    return latent, skips

  def decode(self, latent: jnp.ndarray, skips: Sequence[jnp.ndarray] | None = None, *,
             train: bool, prune_level: int | None = None) -> Heads:
    """Heads from a latent (and, with skip_mode="source", the encoder's skips; with
    "none" ``skips`` is ignored). Returns ``__call__``'s output."""
    level = self._level(prune_level)
    skips = self._check_code(latent, skips)
    if self.skip_mode == "source" and level < self.depth - 1:
      return self._heads(self._nested(list(skips[:level + 1]), train), prune_level)
    bottom = self.from_latent(latent.astype(self.dtype)) if self.latent_channels else latent
    cols = self._generate(bottom, train) if self.skip_mode == "none" else [*skips, bottom]
    return self._heads(self._nested(cols[:level + 1], train), prune_level)

  def __call__(self, x: jnp.ndarray, *, train: bool, prune_level: int | None = None) -> Heads:
    """Head outputs (B, H, W, out_channels) float32: a list over X_{0,1..d-1} with deep
    supervision, else (or with ``prune_level=L``: head L) one array."""
    level = self._level(prune_level)
    if self.skip_mode == "source" and level < self.depth - 1:  # pruned: no bottleneck
      self._check_input(x)
      return self._heads(self._nested(self.encoder(x, train, level + 1), train), prune_level)
    latent, skips = self._encode(x, train)
    return self.decode(latent, skips, train=train, prune_level=prune_level)
