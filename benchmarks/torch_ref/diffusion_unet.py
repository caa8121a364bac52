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
NCHW. Implemented: the unconditional model and concat conditioning
(``concat_channels``: a latent concatenated to x_t at the input, the LTDiff++
denoiser); not implemented: class, SPADE, cross-attention and reference
conditioning.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Preset keys that only matter for conditioning paths the reference omits.
_IGNORED_KEYS = ("spade_hidden", "ref_token_dim", "ref_num_tokens", "dtype",
                 "attention_impl")
_UNSUPPORTED = ("learned_variance", "num_classes", "spade_channels",
                "context_dim", "ref_embed_dim", "resblock_updown")


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest number of groups <= ``max_groups`` that divides ``channels``."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
  """GroupNorm with eps 1e-5 and ``group_count`` groups (affine)."""
  return nn.GroupNorm(group_count(channels, max_groups), channels, eps=1e-5)


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


class ResBlock(nn.Module):
  """GN-SiLU-conv, scale-shift FiLM from the time embedding, GN-SiLU-conv(0), skip."""

  def __init__(self, cin: int, cout: int, emb_dim: int, max_groups: int,
               dropout: float = 0.0):
    super().__init__()
    self.norm_in = group_norm(cin, max_groups)
    self.conv_in = conv3x3(cin, cout)
    self.emb_proj = nn.Linear(emb_dim, 2 * cout)
    self.norm_out = group_norm(cout, max_groups)
    self.dropout = nn.Dropout(dropout)
    self.conv_out = conv3x3(cout, cout, zero=True)
    self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = self.conv_in(F.silu(self.norm_in(x)))
    scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm_out(h) * (1.0 + scale) + shift
    h = self.conv_out(self.dropout(F.silu(h)))
    return self.skip(x) + h


class AttentionBlock(nn.Module):
  """Residual multi-head self-attention over positions: x + W_o attn(GN(x)).

  Q and the fused K/V projections have no bias; W_o has a bias and is
  zero-initialized (a fresh block is the identity).
  """

  def __init__(self, channels: int, num_heads: int, head_dim: int, max_groups: int):
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
    self.key_value = nn.Linear(channels, 2 * channels, bias=False)
    self.out = nn.Linear(channels, channels)
    nn.init.zeros_(self.out.weight)
    nn.init.zeros_(self.out.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
    split = lambda y: y.view(b, h * w, self.heads, -1).transpose(1, 2)
    q = split(self.query(tokens))
    k, v = (split(y) for y in self.key_value(tokens).chunk(2, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
    return x + self.out(o).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
  """One UNet stage: ResBlocks, each optionally followed by attention."""

  def __init__(self, blocks: Sequence[ResBlock], attns: Sequence[nn.Module]):
    super().__init__()
    self.blocks = nn.ModuleList(blocks)
    self.attns = nn.ModuleList(attns)


class DiffusionUNet(nn.Module):
  """eps_theta(x_t, t) with the layout of ``medrep_jax``'s ``DiffusionUNet``.

  Args:
    in_channels: channels of x_t.
    out_channels: channels of the eps prediction.
    base_width: width of level 0; level l is ``base_width * channel_mult[l]``.
    channel_mult: width multipliers; level l is at downsample factor 2**l.
    num_res_blocks: down-path ResBlocks per level (up path: one more).
    attention_resolutions: downsample factors whose blocks get attention.
    mid_attention: attention between the two middle ResBlocks.
    num_heads: heads when ``head_dim`` is 0.
    head_dim: fixed head width when > 0.
    norm_groups: GroupNorm group cap.
    dropout: ResBlock dropout.
    concat_channels: > 0 concatenates ``concat`` (B, concat_channels, H, W)
      to x_t before the input conv.
  """

  def __init__(self, in_channels: int, out_channels: int, base_width: int = 128,
               channel_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
               attention_resolutions: Sequence[int] = (4, 8),
               mid_attention: bool = True, num_heads: int = 4, head_dim: int = 0,
               norm_groups: int = 32, dropout: float = 0.0, concat_channels: int = 0):
    super().__init__()
    self.base_width = base_width
    self.concat_channels = concat_channels
    emb_dim = 4 * base_width
    attn = lambda c, on: (AttentionBlock(c, num_heads, head_dim, norm_groups)
                          if on else nn.Identity())
    res = lambda cin, cout: ResBlock(cin, cout, emb_dim, norm_groups, dropout)
    self.time_embed = nn.Sequential(nn.Linear(base_width, emb_dim), nn.SiLU(),
                                    nn.Linear(emb_dim, emb_dim))
    self.input_conv = conv3x3(in_channels + concat_channels, base_width)

    skip_widths, width = [base_width], base_width
    last = len(channel_mult) - 1
    self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
    for level, mult in enumerate(channel_mult):
      on, blocks, attns = 2 ** level in attention_resolutions, [], []
      for _ in range(num_res_blocks):
        blocks.append(res(width, base_width * mult))
        width = base_width * mult
        attns.append(attn(width, on))
        skip_widths.append(width)
      self.down.append(Level(blocks, attns))
      if level != last:
        self.downsample.append(conv3x3(width, width, stride=2))
        skip_widths.append(width)

    self.mid_0 = res(width, width)
    self.mid_attn = attn(width, mid_attention)
    self.mid_1 = res(width, width)

    self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
    for level in reversed(range(len(channel_mult))):
      on, blocks, attns = 2 ** level in attention_resolutions, [], []
      out_width = base_width * channel_mult[level]
      for _ in range(num_res_blocks + 1):
        blocks.append(res(width + skip_widths.pop(), out_width))
        width = out_width
        attns.append(attn(width, on))
      self.up.append(Level(blocks, attns))
      if level:
        self.upsample.append(conv3x3(width, width))

    self.out_norm = group_norm(width, norm_groups)
    self.out_conv = conv3x3(width, out_channels, zero=True)

  def forward(self, x: torch.Tensor, t: torch.Tensor,
              concat: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W), t (B,)[, concat (B, concat_channels, H, W)] -> eps prediction
    (B, out_channels, H, W).

    Raises:
      ValueError: ``concat`` is missing with ``concat_channels`` > 0, or given without.
    """
    if bool(self.concat_channels) != (concat is not None):
      raise ValueError(f"concat_channels={self.concat_channels} but concat is "
                       f"{'missing' if concat is None else 'given'}")
    if concat is not None:
      x = torch.cat([x, concat.to(x.dtype)], dim=1)
    emb = self.time_embed(timestep_embedding(t, self.base_width))
    h = self.input_conv(x)
    skips = [h]
    for level, stage in enumerate(self.down):
      for block, attn in zip(stage.blocks, stage.attns):
        h = attn(block(h, emb))
        skips.append(h)
      if level < len(self.downsample):
        h = self.downsample[level](h)
        skips.append(h)
    h = self.mid_1(self.mid_attn(self.mid_0(h, emb)), emb)
    for i, stage in enumerate(self.up):
      for block, attn in zip(stage.blocks, stage.attns):
        h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
      if i < len(self.upsample):
        h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
    return self.out_conv(F.silu(self.out_norm(h)))


def unet_from_config(config: Mapping[str, Any], in_channels: int,
                     out_channels: int) -> DiffusionUNet:
  """A reference UNet from a ``medrep_jax`` ``diffusion_unet_config`` dict.

  Raises:
    ValueError: the config enables a feature the reference does not implement.
  """
  used = {k: v for k, v in config.items() if k not in _IGNORED_KEYS}
  for key in _UNSUPPORTED:
    if used.pop(key, None):
      raise ValueError(f"the torch reference UNet does not implement {key}")
  return DiffusionUNet(in_channels, out_channels, **used)


def unet_from_flax(module: Any, in_channels: int) -> DiffusionUNet:
  """The reference UNet with the settings of a built flax ``DiffusionUNet`` module
  (its widths, levels, attention and conditioning fields; ``in_channels``: channels
  of x_t, which the flax module infers from its input).

  Raises:
    ValueError: the module enables a feature the reference does not implement.
  """
  keys = list(inspect.signature(DiffusionUNet).parameters)[2:]  # after in/out channels
  config = {k: getattr(module, k) for k in (*keys, *_UNSUPPORTED)}
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
  ema <- decay * ema + (1 - decay) * params (as ``optax.incremental_update``).

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
    loss.backward()
    self.optimizer.step()
    if self.ema is not None:
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return loss.detach()


def _torch_to_flax_names(model: DiffusionUNet) -> dict[str, str]:
  """Maps each torch module path to the ``DiffusionUNet`` (flax) parameter path."""
  names = {"time_embed.0": "time_embed/dense_0", "time_embed.2": "time_embed/dense_1",
           "input_conv": "input_conv", "mid_0": "mid_0", "mid_attn": "mid_attn",
           "mid_1": "mid_1", "out_norm": "out_norm", "out_conv": "out_conv"}
  last = len(model.down) - 1
  for level, stage in enumerate(model.down):
    for b in range(len(stage.blocks)):
      names[f"down.{level}.blocks.{b}"] = f"down_{level}_{b}"
      names[f"down.{level}.attns.{b}"] = f"down_{level}_{b}_attn"
    if level < last:
      names[f"downsample.{level}"] = f"down_{level}_downsample"
  for i, stage in enumerate(model.up):
    level = last - i
    for b in range(len(stage.blocks)):
      names[f"up.{i}.blocks.{b}"] = f"up_{level}_{b}"
      names[f"up.{i}.attns.{b}"] = f"up_{level}_{b}_attn"
    if level:
      names[f"upsample.{i}"] = f"up_{level}_upsample"
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
    for key in names[prefix].split("/") + ([rest] if rest else []):
      node = node[key]
    value = _flax_value(node, leaf, module, tensor.shape)
    state[name] = torch.from_numpy(np.array(value, np.float32)).reshape(
        tensor.shape)
  model.load_state_dict(state)
