"""PyTorch eps-prediction UNet and DDPM train step, shaped like ``DiffusionUNet``.

Written from the papers: DDPM (Ho et al., 2020, App. B: sinusoidal time
embedding, GroupNorm ResBlocks, self-attention, skip concatenation) with the
ADM refinements (Dhariwal & Nichol, 2021: scale-shift time FiLM
``GN(h) * (1 + s) + b``, a ResBlock-attention-ResBlock middle, one extra
up-path ResBlock per level, multi-head attention at chosen downsample
factors). Downsampling is a stride-2 3x3 conv and upsampling is nearest x2 +
3x3 conv, as in ``medrep_jax.models.diffusion_unet`` with
``resblock_updown=False``.

The layer list, widths, GroupNorm group counts, bias flags and zero-inits
mirror the JAX module, so for the same preset both have the same parameter
count and FLOPs (``tests/test_benchmarks.py`` checks the count). Tensors are
NCHW. Implemented: the unconditional model, concat conditioning
(``concat_channels``: a latent concatenated to x_t at the input, the LTDiff++
denoiser) and DSDM's generator (paper 004, Sec. IV-B): SPADE on a semantic map
in the up-path ResBlocks and, with ``spade_mid``, the middle ones (Park et al.,
2019, eq. 1: parameter-free GroupNorm, ``x * (1 + gamma(m)) + beta(m)``), MCAA
(eq. 10-11: a per-resolution Linear Psi_FC from the reference embedding to h*w
tokens, the keys/values of a residual cross-attention block) and the
learned-range variance output (improved DDPM: 2C channels). Not implemented:
class labels, context cross-attention, feature fusion, in-block resampling.

Also here: the DDPM L_simple step (``DDPMTrainStep``), DSDM's generator step
(``DSDMTrainStep``: hflip, both conditions dropped together, the hybrid loss
L_simple + lambda L_vlb of improved DDPM with the discretized Gaussian decoder
at t = 0, Adam, EMA) on the cosine schedule, and the guided DDIM loop of
DSDM's sampling (``guided_ddim_sample``, eq. 17).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Preset keys that do not change the function or the layers.
_IGNORED_KEYS = ("dtype", "attention_impl", "remat")
_UNSUPPORTED = ("num_classes", "context_dim", "resblock_updown")


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest number of groups <= ``max_groups`` that divides ``channels``."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def group_norm(channels: int, max_groups: int, affine: bool = True) -> nn.GroupNorm:
  """GroupNorm with eps 1e-5 and ``group_count`` groups (affine unless told)."""
  return nn.GroupNorm(group_count(channels, max_groups), channels, eps=1e-5, affine=affine)


def conv3x3(cin: int, cout: int, stride: int = 1, zero: bool = False) -> nn.Conv2d:
  """3x3 conv with padding 1; ``zero`` zero-initializes weight and bias."""
  layer = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
  if zero:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
  return layer


def timestep_embedding(t: torch.Tensor, dim: int,
                       max_period: float = 10_000.0) -> torch.Tensor:
  """[cos(t f), sin(t f)] with f_i = max_period ** (-i / (dim // 2)); (B, dim)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period)
                    * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


class SPADE(nn.Module):
  """Spatially-adaptive GroupNorm (Park et al., 2019, eq. 1; DSDM Sec. III-B2).

  ``GN(x) * (1 + gamma(m)) + beta(m)``: GN without affine parameters; m the
  semantic map resized to x's size (nearest, sampling at pixel centres, as
  ``jax.image.resize``); gamma and beta are 3x3 convs on a shared 3x3 conv +
  ReLU of m (``hidden`` wide).
  """

  def __init__(self, channels: int, segmap_channels: int, hidden: int, max_groups: int):
    super().__init__()
    self.norm = group_norm(channels, max_groups, affine=False)
    self.shared = conv3x3(segmap_channels, hidden)
    self.gamma = conv3x3(hidden, channels)
    self.beta = conv3x3(hidden, channels)

  def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
    if segmap.shape[-2:] != x.shape[-2:]:
      segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest-exact")
    a = F.relu(self.shared(segmap.to(x.dtype)))
    return self.norm(x) * (1.0 + self.gamma(a)) + self.beta(a)


class ResBlock(nn.Module):
  """GN-SiLU-conv, scale-shift FiLM from the time embedding, GN-SiLU-conv(0), skip.

  With ``spade_channels`` > 0 both norms are ``SPADE`` on the semantic map.
  """

  def __init__(self, cin: int, cout: int, emb_dim: int, max_groups: int,
               dropout: float = 0.0, spade_channels: int = 0, spade_hidden: int = 0):
    super().__init__()
    self.spade = bool(spade_channels)
    if self.spade:
      self.spade_in = SPADE(cin, spade_channels, spade_hidden, max_groups)
    else:
      self.norm_in = group_norm(cin, max_groups)
    self.conv_in = conv3x3(cin, cout)
    self.emb_proj = nn.Linear(emb_dim, 2 * cout)
    if self.spade:
      self.spade_out = SPADE(cout, spade_channels, spade_hidden, max_groups)
    else:
      self.norm_out = group_norm(cout, max_groups)
    self.dropout = nn.Dropout(dropout)
    self.conv_out = conv3x3(cout, cout, zero=True)
    self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def _norm(self, which: str, h: torch.Tensor, segmap: torch.Tensor | None) -> torch.Tensor:
    if self.spade:
      if segmap is None:
        raise ValueError("a SPADE ResBlock needs the semantic map")
      return getattr(self, f"spade_{which}")(h, segmap)
    return getattr(self, f"norm_{which}")(h)

  def forward(self, x: torch.Tensor, emb: torch.Tensor,
              segmap: torch.Tensor | None = None) -> torch.Tensor:
    h = self.conv_in(F.silu(self._norm("in", x, segmap)))
    scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self._norm("out", h, segmap) * (1.0 + scale) + shift
    h = self.conv_out(self.dropout(F.silu(h)))
    return self.skip(x) + h


class AttentionBlock(nn.Module):
  """Residual multi-head attention over positions: x + W_o attn(W_q GN(x), W_kv c).

  ``c`` is GN(x) itself (self-attention) or, with ``context_dim`` > 0, a
  context sequence (B, L, context_dim) (cross-attention: DSDM's MCAA on the
  Psi_FC tokens). Q and the fused K/V projections have no bias; W_o has a bias
  and is zero-initialized (a fresh block is the identity).
  """

  def __init__(self, channels: int, num_heads: int, head_dim: int, max_groups: int,
               context_dim: int = 0):
    super().__init__()
    if head_dim > 0:
      if channels % head_dim:
        raise ValueError(f"{channels} channels not divisible by head_dim={head_dim}")
      num_heads = channels // head_dim
    elif channels % num_heads:
      raise ValueError(f"{channels} channels not divisible by num_heads={num_heads}")
    self.heads = num_heads
    self.norm = group_norm(channels, max_groups)
    self.query = nn.Linear(channels, channels, bias=False)
    self.key_value = nn.Linear(context_dim or channels, 2 * channels, bias=False)
    self.out = nn.Linear(channels, channels)
    nn.init.zeros_(self.out.weight)
    nn.init.zeros_(self.out.bias)

  def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    b, c, h, w = x.shape
    tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
    src = tokens if context is None else context.to(tokens.dtype)
    split = lambda y: y.view(b, y.shape[1], self.heads, -1).transpose(1, 2)
    q = split(self.query(tokens))
    k, v = (split(y) for y in self.key_value(src).chunk(2, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
    return x + self.out(o).transpose(1, 2).reshape(b, c, h, w)


class ReferenceTokens(nn.Module):
  """Psi_FC of MCAA (DSDM eq. 10): (B, n) -> Linear -> (B, num_tokens, token_dim)."""

  def __init__(self, embed_dim: int, num_tokens: int, token_dim: int):
    super().__init__()
    self.num_tokens, self.token_dim = num_tokens, token_dim
    self.fc = nn.Linear(embed_dim, num_tokens * token_dim)

  def forward(self, ref_embed: torch.Tensor) -> torch.Tensor:
    return self.fc(ref_embed).view(ref_embed.shape[0], self.num_tokens, self.token_dim)


class Level(nn.Module):
  """One UNet stage: ResBlocks, each optionally followed by self-attention and by
  MCAA cross-attention (``xattns``)."""

  def __init__(self, blocks: Sequence[ResBlock], attns: Sequence[nn.Module],
               xattns: Sequence[nn.Module] | None = None):
    super().__init__()
    self.blocks = nn.ModuleList(blocks)
    self.attns = nn.ModuleList(attns)
    self.xattns = nn.ModuleList(xattns or [nn.Identity() for _ in blocks])


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(size)


class DiffusionUNet(nn.Module):
  """eps_theta(x_t, t[, conditions]) with the layout of ``medrep_jax``'s ``DiffusionUNet``.

  Args:
    in_channels: channels of x_t.
    out_channels: channels of the eps prediction (the output has twice as many
      with ``learned_variance``: [eps, v]).
    base_width: width of level 0; level l is ``base_width * channel_mult[l]``.
    channel_mult: width multipliers; level l is at downsample factor 2**l.
    num_res_blocks: down-path ResBlocks per level (up path: one more).
    attention_resolutions: downsample factors whose blocks get attention.
    mid_attention: attention (and MCAA) between the two middle ResBlocks.
    num_heads: heads when ``head_dim`` is 0.
    head_dim: fixed head width when > 0.
    norm_groups: GroupNorm group cap.
    dropout: ResBlock dropout.
    concat_channels: > 0 concatenates ``concat`` (B, concat_channels, H, W)
      to x_t before the input conv.
    learned_variance: output 2 x out_channels (improved DDPM's v).
    spade_channels: > 0: SPADE on a ``segmap`` (B, spade_channels, H', W') in
      the up-path ResBlocks (and the middle ones with ``spade_mid``).
    spade_hidden: width of SPADE's shared conv.
    spade_mid: SPADE also in ``mid_0``/``mid_1``.
    ref_embed_dim: > 0: MCAA on ``ref_embed`` (B, ref_embed_dim) at
      ``ref_attention_resolutions`` (None: the attention resolutions) and in
      the middle iff ``mid_attention``.
    ref_token_dim: width of the Psi_FC tokens.
    ref_num_tokens: tokens per Psi_FC; 0 means h*w of the resolution, which
      needs ``image_size``.
    ref_attention_resolutions: downsample factors with MCAA.
    image_size: (H, W) or H = W of x_t; only read for ``ref_num_tokens`` = 0.
  """

  def __init__(self, in_channels: int, out_channels: int, base_width: int = 128,
               channel_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
               attention_resolutions: Sequence[int] = (4, 8),
               mid_attention: bool = True, num_heads: int = 4, head_dim: int = 0,
               norm_groups: int = 32, dropout: float = 0.0, concat_channels: int = 0,
               learned_variance: bool = False, spade_channels: int = 0,
               spade_hidden: int = 128, spade_mid: bool = False, ref_embed_dim: int = 0,
               ref_token_dim: int = 64, ref_num_tokens: int = 0,
               ref_attention_resolutions: Sequence[int] | None = None,
               image_size: int | Sequence[int] | None = None):
    super().__init__()
    self.base_width = base_width
    self.concat_channels = concat_channels
    self.spade_channels = spade_channels
    self.ref_embed_dim = ref_embed_dim
    emb_dim = 4 * base_width
    attn_res = tuple(attention_resolutions)
    ref_res = attn_res if ref_attention_resolutions is None else tuple(
        ref_attention_resolutions)
    levels = [2 ** l for l in range(len(channel_mult))]
    if ref_embed_dim and not set(ref_res) <= set(levels):
      raise ValueError(f"ref_attention_resolutions={ref_res} must be downsample factors "
                       f"of the levels {levels}")
    attn = lambda c, on: (AttentionBlock(c, num_heads, head_dim, norm_groups)
                          if on else nn.Identity())
    xattn = lambda c, on: (AttentionBlock(c, num_heads, head_dim, norm_groups,
                                          context_dim=ref_token_dim)
                           if on and ref_embed_dim else nn.Identity())
    res = lambda cin, cout, spade=False: ResBlock(
        cin, cout, emb_dim, norm_groups, dropout,
        spade_channels if spade else 0, spade_hidden)
    self.time_embed = nn.Sequential(nn.Linear(base_width, emb_dim), nn.SiLU(),
                                    nn.Linear(emb_dim, emb_dim))
    self.input_conv = conv3x3(in_channels + concat_channels, base_width)

    skip_widths, width = [base_width], base_width
    last = len(channel_mult) - 1
    self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
    for level, mult in enumerate(channel_mult):
      on, mcaa, blocks, attns, xattns = 2 ** level in attn_res, 2 ** level in ref_res, [], [], []
      for _ in range(num_res_blocks):
        blocks.append(res(width, base_width * mult))
        width = base_width * mult
        attns.append(attn(width, on))
        xattns.append(xattn(width, mcaa))
        skip_widths.append(width)
      self.down.append(Level(blocks, attns, xattns))
      if level != last:
        self.downsample.append(conv3x3(width, width, stride=2))
        skip_widths.append(width)

    spade, mid_spade = bool(spade_channels), bool(spade_channels) and spade_mid
    self.mid_0 = res(width, width, mid_spade)
    self.mid_attn = attn(width, mid_attention)
    self.mid_xattn = xattn(width, mid_attention)
    self.mid_1 = res(width, width, mid_spade)

    self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
    for level in reversed(range(len(channel_mult))):
      on, mcaa, blocks, attns, xattns = 2 ** level in attn_res, 2 ** level in ref_res, [], [], []
      out_width = base_width * channel_mult[level]
      for _ in range(num_res_blocks + 1):
        blocks.append(res(width + skip_widths.pop(), out_width, spade))
        width = out_width
        attns.append(attn(width, on))
        xattns.append(xattn(width, mcaa))
      self.up.append(Level(blocks, attns, xattns))
      if level:
        self.upsample.append(conv3x3(width, width))

    self.out_norm = group_norm(width, norm_groups)
    self.out_conv = conv3x3(width, out_channels * (2 if learned_variance else 1), zero=True)

    # One Psi_FC per resolution with MCAA (the middle shares the deepest level's).
    self.ref_fc = nn.ModuleDict()
    if ref_embed_dim:
      used = {ds for ds in levels if ds in ref_res} | ({2 ** last} if mid_attention else set())
      if not ref_num_tokens and image_size is None:
        raise ValueError("MCAA with ref_num_tokens=0 (h*w tokens) needs image_size")
      h, w = _pair(image_size) if image_size is not None else (0, 0)
      for ds in sorted(used):
        n = ref_num_tokens or (h // ds) * (w // ds)
        self.ref_fc[str(ds)] = ReferenceTokens(ref_embed_dim, n, ref_token_dim)

  def _check(self, name: str, attr: str, value: int, arg: torch.Tensor | None) -> None:
    if bool(value) != (arg is not None):
      raise ValueError(f"{attr}={value} but {name} is {'missing' if arg is None else 'given'}")

  def forward(self, x: torch.Tensor, t: torch.Tensor,
              concat: torch.Tensor | None = None, segmap: torch.Tensor | None = None,
              ref_embed: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W), t (B,)[, concat (B, concat_channels, H, W)][, segmap (B,
    spade_channels, H', W')][, ref_embed (B, ref_embed_dim)] -> (B, out, H, W)
    (out = 2 x out_channels with ``learned_variance``).

    Raises:
      ValueError: a condition is missing for an enabled input, or given without.
    """
    self._check("concat", "concat_channels", self.concat_channels, concat)
    self._check("segmap", "spade_channels", self.spade_channels, segmap)
    self._check("ref_embed", "ref_embed_dim", self.ref_embed_dim, ref_embed)
    if concat is not None:
      x = torch.cat([x, concat.to(x.dtype)], dim=1)
    tokens = {int(ds): fc(ref_embed) for ds, fc in self.ref_fc.items()} if (
        ref_embed is not None) else {}
    emb = self.time_embed(timestep_embedding(t, self.base_width))

    def attend(h, attn, xattn, ds):
      h = attn(h)
      return xattn(h, tokens[ds]) if isinstance(xattn, AttentionBlock) else h

    h = self.input_conv(x)
    skips = [h]
    for level, stage in enumerate(self.down):
      for block, attn, xattn in zip(stage.blocks, stage.attns, stage.xattns):
        h = attend(block(h, emb), attn, xattn, 2 ** level)
        skips.append(h)
      if level < len(self.downsample):
        h = self.downsample[level](h)
        skips.append(h)
    deepest = 2 ** (len(self.down) - 1)
    h = attend(self.mid_0(h, emb, segmap), self.mid_attn, self.mid_xattn, deepest)
    h = self.mid_1(h, emb, segmap)
    for i, stage in enumerate(self.up):
      ds = 2 ** (len(self.up) - 1 - i)
      for block, attn, xattn in zip(stage.blocks, stage.attns, stage.xattns):
        h = attend(block(torch.cat([h, skips.pop()], dim=1), emb, segmap), attn, xattn, ds)
      if i < len(self.upsample):
        h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
    return self.out_conv(F.silu(self.out_norm(h)))


def unet_from_config(config: Mapping[str, Any], in_channels: int,
                     out_channels: int) -> DiffusionUNet:
  """A reference UNet from a ``medrep_jax`` ``diffusion_unet_config`` dict (plus, for
  MCAA with h*w tokens, ``image_size``).

  Raises:
    ValueError: the config enables a feature the reference does not implement.
  """
  used = {k: v for k, v in config.items() if k not in _IGNORED_KEYS}
  for key in _UNSUPPORTED:
    if used.pop(key, None):
      raise ValueError(f"the torch reference UNet does not implement {key}")
  if used.pop("fusion", "none") != "none":
    raise ValueError("the torch reference UNet does not implement fusion")
  used.pop("fusion_blocks", None)
  if not used.pop("use_scale_shift_norm", True):
    raise ValueError("the torch reference UNet does not implement "
                     "use_scale_shift_norm=False")
  return DiffusionUNet(in_channels, out_channels, **used)


def unet_from_flax(module: Any, in_channels: int,
                   image_size: int | Sequence[int] | None = None) -> DiffusionUNet:
  """The reference UNet with the settings of a built flax ``DiffusionUNet`` module
  (its widths, levels, attention and conditioning fields; ``in_channels``: channels
  of x_t, which the flax module infers from its input; ``image_size``: the input's
  (H, W), needed for MCAA with h*w tokens, which the flax module sizes at its first call).

  Raises:
    ValueError: the module enables a feature the reference does not implement.
  """
  keys = list(inspect.signature(DiffusionUNet).parameters)[2:-1]  # after in/out channels
  config = {k: getattr(module, k) for k in (*keys, *_UNSUPPORTED, "fusion",
                                            "use_scale_shift_norm")}
  if image_size is not None:
    config["image_size"] = image_size
  return unet_from_config(config, in_channels, int(module.out_channels))


def count_params(model: nn.Module) -> int:
  """Number of trainable scalars."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def linear_alphas_cumprod(num_timesteps: int = 1000) -> torch.Tensor:
  """alpha-bar_t of DDPM's linear schedule (1e-4..0.02 at T = 1000), float64."""
  scale = 1000.0 / num_timesteps
  betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
  return torch.cumprod(1.0 - betas, dim=0)


class DDPMTrainStep:
  """One L_simple step (DDPM Alg. 1, eq. 14): MSE(eps, eps_theta(q_sample(x0, t, eps), t)).

  With ``cond``, the model is ``model(x_t, t, cond)`` (concat conditioning); with
  ``ema_decay``, an EMA of the parameters follows each update,
  ema <- ema + (1 - decay) / (1 - decay^t) * (params - ema) at update t (the JAX
  ``EMAParams``' bias-corrected EMA).

  Args:
    model: the eps-prediction network ``model(x_t, t[, cond])``.
    lr: learning rate.
    weight_decay: AdamW decoupled weight decay (Adam: L2 added to the gradient).
    num_timesteps: T of the linear-beta schedule.
    fused: use the fused CPU/GPU optimizer kernel when this torch supports it.
    optimizer: "adamw" or "adam".
    ema_decay: None (no EMA) or the decay in [0, 1).
  """

  def __init__(self, model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-4,
               num_timesteps: int = 1000, fused: bool = True, optimizer: str = "adamw",
               ema_decay: float | None = None):
    self.model = model
    device = next(model.parameters()).device
    ac = linear_alphas_cumprod(num_timesteps)
    self.sqrt_ab = ac.sqrt().float().to(device)
    self.sqrt_1m_ab = (1.0 - ac).sqrt().float().to(device)
    self.num_timesteps = num_timesteps
    optimizers = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    if optimizer not in optimizers:
      raise ValueError(f"optimizer={optimizer!r}; expected one of {sorted(optimizers)}")
    make = optimizers[optimizer]
    try:
      self.optimizer = make(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
      self.fused = fused
    except (RuntimeError, TypeError):
      self.optimizer = make(model.parameters(), lr=lr, weight_decay=weight_decay,
                            foreach=True)
      self.fused = False
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.ema_decay = ema_decay
    self.ema = ([p.detach().clone() for p in self.params]
                if ema_decay is not None else None)

  def q_sample(self, x0: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a-bar_t) x0 + sqrt(1 - a-bar_t) eps (DDPM eq. 4)."""
    return (self.sqrt_ab[t][:, None, None, None] * x0
            + self.sqrt_1m_ab[t][:, None, None, None] * noise)

  def loss(self, x0: torch.Tensor, t: torch.Tensor | None = None,
           noise: torch.Tensor | None = None,
           cond: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple for t ~ U{0..T-1} and eps ~ N(0, I) unless given."""
    if t is None:
      t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
    if noise is None:
      noise = torch.randn_like(x0)
    args = () if cond is None else (cond,)
    return F.mse_loss(self.model(self.q_sample(x0, t, noise), t, *args), noise)

  def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None,
               noise: torch.Tensor | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
    """Forward, backward, optimizer update (and EMA); returns the (detached) loss."""
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(x0, t, noise, cond)
    return _update(self, loss)


# ------------------------------------------------------------------ DSDM: hybrid loss, step, DDIM


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008) -> np.ndarray:
  """beta_t of improved DDPM's cosine schedule (Nichol & Dhariwal eq. 17), float64:
  a-bar(t) = f(t) / f(0) with f(t) = cos^2((t/T + s) / (1 + s) * pi / 2), beta_t =
  1 - a-bar_t / a-bar_{t-1}, clipped at 0.999."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], 0.999)


class DiffusionTables:
  """The per-timestep constants of DDPM (eqs. 4, 6-7) from betas (float64, stored float32).

  Attributes (float32 tensors (T,)): ``betas``, ``sqrt_ab`` / ``sqrt_1m_ab`` (sqrt of
  a-bar_t and of 1 - a-bar_t), ``coef_x0`` / ``coef_xt`` (the posterior mean
  mu~_t = coef_x0 x0 + coef_xt x_t), ``post_log_var`` (log beta~_t, its 0 at t = 0
  replaced by beta~_1: improved DDPM's clipped log variance), ``log_betas``.
  """

  def __init__(self, betas: np.ndarray, device: Any = "cpu"):
    betas = np.asarray(betas, np.float64)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    f32 = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(device)
    self.num_timesteps = len(betas)
    self.betas = f32(betas)
    self.log_betas = torch.log(self.betas)  # of the float32 betas, as the JAX core
    self.sqrt_ab = f32(np.sqrt(ab))
    self.sqrt_1m_ab = f32(np.sqrt(1.0 - ab))
    self.coef_x0 = f32(betas * np.sqrt(ab_prev) / (1.0 - ab))
    self.coef_xt = f32((1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab))
    self.post_log_var = f32(np.log(np.append(post_var[1], post_var[1:])))


def _per_example(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  return table[t][:, None, None, None]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
  """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
  """log P(bin of x) for 8-bit data in [-1, 1] under N(mean, e^(2 log_scale)) (DDPM
  Sec. 3.3): the bin [x - 1/255, x + 1/255], the first bin from -inf and the last to
  +inf; exact normal CDF (the difference taken in the tail where it does not cancel),
  probabilities floored at 1e-12."""
  inv_std = torch.exp(-log_scale)
  upper = inv_std * (x - mean + 1.0 / 255.0)
  lower = inv_std * (x - mean - 1.0 / 255.0)
  ndtr = torch.special.ndtr
  mass = torch.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
  log_mass = torch.log(torch.clamp(mass, min=1e-12))
  return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                     torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mass))


def hybrid_loss(tables: DiffusionTables, output: torch.Tensor, x0: torch.Tensor,
                xt: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                lambda_vlb: float = 0.001) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Per-example (loss, mse, vlb) of L_hybrid = L_simple + lambda L_vlb (improved DDPM
  Sec. 3.1; DSDM eq. 14-16) for an eps-prediction output [eps (C), v (C)] (B, 2C, H, W).

  L_simple = mean (eps - eps_theta)^2. The model's p(x_{t-1} | x_t) has the mean mu~ of
  x0_hat = (x_t - sqrt(1 - a-bar) eps_theta) / sqrt(a-bar), with eps_theta detached (L_vlb
  trains the variance only), and log Sigma = f log beta_t + (1 - f) log beta~_t with
  f = (v + 1) / 2 (improved DDPM eq. 15). L_t (bits/dim) is KL(q(x_{t-1} | x_t, x0) || p)
  for t > 0 and the discretized-Gaussian NLL of x0 at t = 0; L_vlb is estimated as T L_t.
  """
  c = x0.shape[1]
  eps, v = output[:, :c], output[:, c:]
  mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
  sab, s1m = _per_example(tables.sqrt_ab, t), _per_example(tables.sqrt_1m_ab, t)
  coef_x0, coef_xt = _per_example(tables.coef_x0, t), _per_example(tables.coef_xt, t)
  min_log = _per_example(tables.post_log_var, t)
  frac = (v + 1.0) / 2.0
  log_var = frac * _per_example(tables.log_betas, t) + (1.0 - frac) * min_log
  x0_hat = (xt - s1m * eps.detach()) / sab
  mean = coef_x0 * x0_hat + coef_xt * xt
  true_mean = coef_x0 * x0 + coef_xt * xt
  kl = normal_kl(true_mean, min_log, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(
      dim=(1, 2, 3)) / math.log(2.0)
  vlb = torch.where(t == 0, nll, kl)
  return mse + lambda_vlb * tables.num_timesteps * vlb, mse, vlb


class DSDMTrainStep:
  """One DSDM generator step (paper 004, Sec. IV-B): eps_theta(x_t, t, mask, ref) with
  the hybrid loss, Adam and the EMA of the weights.

  Per example: a horizontal flip of image and mask with probability 1/2; the one-hot
  mask and the reference embedding both replaced by zeros (the null condition of
  eq. 17) with probability ``p_uncond``; t ~ U{0..T-1}, eps ~ N(0, I),
  x_t = sqrt(a-bar_t) x0 + sqrt(1 - a-bar_t) eps with x0 = 2 image - 1.

  Args:
    model: a ``DiffusionUNet`` with ``learned_variance``, ``spade_channels`` and
      ``ref_embed_dim``.
    tables: the schedule's ``DiffusionTables``.
    num_mask_classes: K of the one-hot mask (the model's ``spade_channels``).
    lr: Adam learning rate.
    ema_decay: None or the EMA decay (bias-corrected, as the JAX ``EMAParams``).
    p_uncond: probability of dropping both conditions.
    lambda_vlb: lambda of the hybrid loss.
    hflip: flip augmentation.
    fused: the fused Adam kernel where this torch has one.
  """

  def __init__(self, model: nn.Module, tables: DiffusionTables, num_mask_classes: int, *,
               lr: float = 2e-4, ema_decay: float | None = 0.999, p_uncond: float = 0.2,
               lambda_vlb: float = 0.001, hflip: bool = True, fused: bool = True):
    self.model, self.tables, self.num_classes = model, tables, num_mask_classes
    self.p_uncond, self.lambda_vlb, self.hflip = p_uncond, lambda_vlb, hflip
    params = list(model.parameters())
    try:
      self.optimizer = torch.optim.Adam(params, lr=lr, fused=fused)
      self.fused = fused
    except (RuntimeError, TypeError):
      self.optimizer = torch.optim.Adam(params, lr=lr, foreach=True)
      self.fused = False
    self.params = [p for p in params if p.requires_grad]
    self.ema_decay = ema_decay
    self.ema = [p.detach().clone() for p in self.params] if ema_decay is not None else None

  def loss(self, image: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor,
           t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
           flip: torch.Tensor | None = None, drop: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean hybrid loss, {"mse", "vlb", "output"}) on image (B, C, H, W) in [0, 1],
    int mask (B, H, W) and ref (B, n); t, noise, flip (bool (B,)) and drop (bool (B,))
    are drawn unless given."""
    b, dev = image.shape[0], image.device
    if self.hflip:
      if flip is None:
        flip = torch.rand(b, device=dev) < 0.5
      image = torch.where(flip[:, None, None, None], image.flip(-1), image)
      mask = torch.where(flip[:, None, None], mask.flip(-1), mask)
    segmap = F.one_hot(mask.long(), self.num_classes).permute(0, 3, 1, 2).to(image.dtype)
    if self.p_uncond > 0:
      if drop is None:
        drop = torch.rand(b, device=dev) < self.p_uncond
      keep = (~drop).to(image.dtype)
      segmap = segmap * keep[:, None, None, None]
      ref = ref * keep[:, None]
    if t is None:
      t = torch.randint(0, self.tables.num_timesteps, (b,), device=dev)
    x0 = image * 2.0 - 1.0
    if noise is None:
      noise = torch.randn_like(x0)
    xt = _per_example(self.tables.sqrt_ab, t) * x0 + _per_example(self.tables.sqrt_1m_ab, t) * noise
    output = self.model(xt, t, None, segmap, ref).float()
    loss, mse, vlb = hybrid_loss(self.tables, output, x0, xt, noise, t, self.lambda_vlb)
    return loss.mean(), {"mse": mse.detach(), "vlb": vlb.detach(), "output": output.detach()}

  def __call__(self, image: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor,
               **fixed: torch.Tensor) -> torch.Tensor:
    """Forward, backward, Adam update and EMA; returns the (detached) loss."""
    self.optimizer.zero_grad(set_to_none=True)
    loss, _ = self.loss(image, mask, ref, **fixed)
    return _update(self, loss)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """round(linspace(0, T - 1, n)): n evenly spaced timesteps keeping 0 and T - 1."""
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


@torch.no_grad()
def guided_ddim_sample(model: nn.Module, tables: DiffusionTables, x_T: torch.Tensor,
                       segmap: torch.Tensor, ref: torch.Tensor, *, num_steps: int = 50,
                       guidance_scale: float = 3.0, clip_x0: float | None = 1.0
                       ) -> torch.Tensor:
  """Deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) with classifier-free guidance.

  Each step runs the model once on the 2B batch [conditional; null] (the null condition:
  zero mask and zero reference), guides the eps half, eps^ = eps_c + s (eps_c - eps_u)
  (DSDM eq. 17; the variance half is unused by DDIM), predicts x0 = (x_t - sqrt(1 - a-bar)
  eps^) / sqrt(a-bar) (clipped to [-clip_x0, clip_x0], eps^ recomputed from it) and steps
  to x_prev = sqrt(a-bar_prev) x0 + sqrt(1 - a-bar_prev) eps^, a-bar_prev of the next
  kept (lower) timestep and 1 after the last.
  """
  steps = ddim_timesteps(tables.num_timesteps, num_steps)[::-1].copy()
  x, b = x_T, x_T.shape[0]
  c = x.shape[1]
  both_seg = torch.cat([segmap, torch.zeros_like(segmap)])
  both_ref = torch.cat([ref, torch.zeros_like(ref)])
  for k, step in enumerate(steps):
    t = torch.full((2 * b,), int(step), dtype=torch.long, device=x.device)
    out = model(torch.cat([x, x]), t, None, both_seg, both_ref).float()
    eps_c, eps_u = out[:b, :c], out[b:, :c]
    eps = eps_c + guidance_scale * (eps_c - eps_u)
    sab, s1m = tables.sqrt_ab[step], tables.sqrt_1m_ab[step]
    x0 = (x - s1m * eps) / sab
    if clip_x0 is not None:
      x0 = x0.clamp(-clip_x0, clip_x0)
      eps = (x - sab * x0) / s1m
    if k + 1 < len(steps):
      nxt = steps[k + 1]
      x = tables.sqrt_ab[nxt] * x0 + tables.sqrt_1m_ab[nxt] * eps
    else:
      x = x0
  return x


def _torch_to_flax_names(model: DiffusionUNet) -> dict[str, str]:
  """Maps each torch module path to the ``DiffusionUNet`` (flax) parameter path."""
  names = {"time_embed.0": "time_embed/dense_0", "time_embed.2": "time_embed/dense_1",
           "input_conv": "input_conv", "mid_0": "mid_0", "mid_attn": "mid_attn",
           "mid_xattn": "mid_ref_xattn", "mid_1": "mid_1", "out_norm": "out_norm",
           "out_conv": "out_conv"}
  last = len(model.down) - 1
  for level, stage in enumerate(model.down):
    for b in range(len(stage.blocks)):
      names[f"down.{level}.blocks.{b}"] = f"down_{level}_{b}"
      names[f"down.{level}.attns.{b}"] = f"down_{level}_{b}_attn"
      names[f"down.{level}.xattns.{b}"] = f"down_{level}_{b}_ref_xattn"
    if level < last:
      names[f"downsample.{level}"] = f"down_{level}_downsample"
  for i, stage in enumerate(model.up):
    level = last - i
    for b in range(len(stage.blocks)):
      names[f"up.{i}.blocks.{b}"] = f"up_{level}_{b}"
      names[f"up.{i}.attns.{b}"] = f"up_{level}_{b}_attn"
      names[f"up.{i}.xattns.{b}"] = f"up_{level}_{b}_ref_xattn"
    if level:
      names[f"upsample.{i}"] = f"up_{level}_upsample"
  for ds in model.ref_fc:
    names[f"ref_fc.{ds}"] = f"ref_fc_ds{ds}"
  return names


def _flax_value(node: Mapping[str, Any], leaf: str, module: str,
                shape: torch.Size) -> Any:
  """The flax array for one torch parameter, in torch's layout."""
  if leaf == "bias":
    return np.asarray(node["bias"])
  if "scale" in node:  # GroupNorm.
    return np.asarray(node["scale"])
  k = np.asarray(node["kernel"])
  if len(shape) == 4:  # Conv: HWIO -> OIHW.
    return k.transpose(3, 2, 0, 1)
  if module.endswith(".out"):  # DenseGeneral (heads, head_dim, C) -> (C, C_in).
    return k.reshape(-1, shape[0]).T
  return k.reshape(shape[1], -1).T  # Dense / DenseGeneral (C_in, ...) -> (C_out, C_in).


def load_flax_params(model: DiffusionUNet, params: Mapping[str, Any]) -> None:
  """Copies ``DiffusionUNet`` flax params (the ``"params"`` collection) into ``model``.

  Conv kernels HWIO -> OIHW, Dense/DenseGeneral kernels (in..., out...) ->
  (out, in), GroupNorm scale -> weight. Used to check that the two networks
  compute the same function, not only that they have the same size.

  Raises:
    KeyError: a torch parameter has no flax counterpart (layouts differ).
  """
  names = _torch_to_flax_names(model)
  state = {}
  for name, tensor in model.state_dict().items():
    module, _, leaf = name.rpartition(".")
    prefix = module
    while prefix not in names:
      prefix = prefix.rpartition(".")[0]
      if not prefix:
        raise KeyError(f"no flax parameter for torch parameter {name}")
    node = params
    rest = module[len(prefix):].lstrip(".")
    for key in names[prefix].split("/") + (rest.split(".") if rest else []):
      node = node[key]
    value = _flax_value(node, leaf, module, tensor.shape)
    state[name] = torch.from_numpy(np.array(value, np.float32)).reshape(
        tensor.shape)
  model.load_state_dict(state)


def _update(step: Any, loss: torch.Tensor) -> torch.Tensor:
  """Backward, optimizer step and EMA (`step.ema` lerped to `step.params` by the
  bias-corrected weight (1 - decay) / (1 - decay^t) of update t, as the JAX EMAParams)
  of a train step object; returns the detached loss."""
  loss.backward()
  step.optimizer.step()
  if step.ema is not None:
    step.ema_updates = getattr(step, "ema_updates", 0) + 1
    weight = (1.0 - step.ema_decay) / (1.0 - step.ema_decay ** step.ema_updates)
    with torch.no_grad():
      torch._foreach_lerp_(step.ema, step.params, weight)  # pylint: disable=protected-access
  return loss.detach()
