"""PyTorch reference of the DCL-CsTP dual-stream pretraining step.

Written from the dual-stream paper (Sec. III-C/D, eq. 3-6 and 10) in the
reading of DESIGN.md, with the shapes of ``medrep_jax.methods.dcl_cstp``:

* the online network F + T (+ predictor h) runs on the three views v1, v2, v3
  as one batch of 3B (one set of BatchNorm statistics, as in JAX);
* the momentum network F_m + T_m runs, without gradients, on v1 and on v2
  separately (two BatchNorm batches, as in JAX), giving keys k1, k2;
* global stream: L_NCE = ½[InfoNCE(q1, k2) + InfoNCE(q2, k1)] against the
  queue of K keys (eq. 3), L_KL = ½[symKL(k2, q1) + symKL(k1, q2)] over the
  queue (eq. 4);
* local stream: L_CS = ½[-cos(h(z2), sg(z3)) - cos(h(z3), sg(z2))] (eq. 6);
* L = L_NCE + α L_KL + β L_CS (eq. 10); SGD with momentum and weight decay;
  then the momentum update θ_m <- m θ_m + (1 - m) θ (eq. 5) and the enqueue
  of k2 into the ring buffer.

The losses run in float32. The step takes ready-made views (a torch
DataLoader would make them on the host); the JAX step also augments on device,
which the benchmark times separately. GPU options: bf16 autocast,
channels-last memory format and ``torch.compile`` of the forward + loss.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref import flax_io
from benchmarks.torch_ref import heads
from benchmarks.torch_ref.resnet import ResNet
from medrep_jax.data import registry


class ContrastiveNet(nn.Module):
  """encoder F, projector T and (optionally) predictor h, named as in JAX."""

  def __init__(self, encoder: ResNet, projector: nn.Module, predictor: nn.Module | None):
    super().__init__()
    self.encoder, self.projector, self.predictor = encoder, projector, predictor

  def embed(self, x: torch.Tensor) -> torch.Tensor:
    """z = T(F(x)), (B, D)."""
    return self.projector(self.encoder(x))


def net_from_config(config: Any) -> ContrastiveNet:
  """The torch network of a ``dcl_cstp`` config (``variant=dcl_cstp``)."""
  m, loss = config.model, config.loss
  if loss.global_stream != "dual" or loss.local_stream != "simsiam" or loss.nt_xent:
    raise ValueError("the torch reference implements the dual-stream step only "
                     "(global_stream=dual, local_stream=simsiam)")
  channels = int(registry.fields_of(config.data)["channels"])  # the preset's when left 0
  if not channels:
    raise ValueError("set data.channels: the torch reference needs the input channels")
  encoder = ResNet(m.encoder, channels, bool(m.small_input))
  d = encoder.feature_dim
  if m.projector == "cstp":
    projector = heads.CrossScaleTokenProjection(d, int(m.cstp_width), int(m.embed_dim),
                                                int(m.cstp_heads), m.attention)
  else:
    projector = heads.MLPHead(d, int(m.mlp_hidden), int(m.embed_dim))
  predictor = None
  if loss.local_predictor:
    predictor = heads.MLPHead(int(m.embed_dim), int(m.predictor_hidden), int(m.embed_dim))
  return ContrastiveNet(encoder, projector, predictor)


def info_nce(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
  """Eq. 3 per example: cross-entropy of [q.k, q.n_1..K]/tau with the positive first."""
  logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ bank.T], dim=1) / tau
  return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long,
                                             device=q.device), reduction="none")


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, bank: torch.Tensor,
                 tau: float) -> torch.Tensor:
  """Eq. 4 per example: ½ KL(P||Q) + ½ KL(Q||P), P, Q = softmax(. n^T / tau)."""
  log_p = F.log_softmax(p @ bank.T / tau, dim=-1)
  log_q = F.log_softmax(q @ bank.T / tau, dim=-1)
  return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


def negative_cosine(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
  """-cos(q, stop_gradient(p)) per example (eq. 6's D)."""
  return -F.cosine_similarity(q, p.detach(), dim=-1, eps=1e-12)


class DualStreamStep:
  """One DCL-CsTP update; ``step(views (3, B, C, H, W))`` returns the loss.

  Args:
    net: the online network (its ``encoder`` and ``projector`` are copied to
      make the momentum network).
    config: the ``dcl_cstp`` config (loss and optim fields are read).
    amp: bf16 autocast for the networks (losses stay float32).
    channels_last: channels-last memory format for the networks and inputs.
    compile: ``torch.compile`` the forward + loss.
  """

  # pylint: disable-next=redefined-builtin
  def __init__(self, net: ContrastiveNet, config: Any, *, amp: bool = False,
               channels_last: bool = False, compile: bool = False):
    l, o = config.loss, config.optim
    self.net = net
    self.momentum_net = nn.ModuleDict({"encoder": copy.deepcopy(net.encoder),
                                       "projector": copy.deepcopy(net.projector)})
    self.momentum_net.requires_grad_(False)
    if channels_last:
      self.net.to(memory_format=torch.channels_last)
      self.momentum_net.to(memory_format=torch.channels_last)
    self.device = next(net.parameters()).device
    self.tau, self.alpha, self.beta, self.m = (float(l.temperature), float(l.alpha),
                                               float(l.beta), float(l.momentum))
    bank = torch.randn(int(l.bank_size), int(config.model.embed_dim), device=self.device)
    self.bank, self.ptr = F.normalize(bank, dim=-1), 0
    self.amp, self.channels_last = amp, channels_last
    self.optimizer = torch.optim.SGD(net.parameters(), lr=float(o.lr),
                                     momentum=float(o.momentum),
                                     weight_decay=float(o.weight_decay), foreach=True)
    self.online = [p for k in ("encoder", "projector")
                   for p in getattr(net, k).parameters()]
    self.target = list(self.momentum_net.parameters())
    self._losses = torch.compile(self.losses) if compile else self.losses

  def _autocast(self):
    if not self.amp:
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=torch.bfloat16)

  def _prep(self, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

  def _keys(self, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), self._autocast():
      z = self.momentum_net["projector"](self.momentum_net["encoder"](self._prep(x)))
    return F.normalize(z.float(), dim=-1)

  def losses(self, views: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(L, {nce, kl, cs}, k2) for views (3, B, C, H, W); no update."""
    v, b = views.shape[:2]
    k1, k2 = self._keys(views[0]), self._keys(views[1])
    with self._autocast():
      z = self.net.embed(self._prep(views.flatten(0, 1)))
      local = z.view(v, b, -1)[-2:].flatten(0, 1)
      p = self.net.predictor(local) if self.net.predictor is not None else local
    z, p = z.float().view(v, b, -1), p.float()
    q1, q2 = F.normalize(z[0], dim=-1), F.normalize(z[1], dim=-1)
    terms = {
        "nce": 0.5 * (info_nce(q1, k2, self.bank, self.tau)
                      + info_nce(q2, k1, self.bank, self.tau)).mean(),
        "kl": 0.5 * (symmetric_kl(k2, q1, self.bank, self.tau)
                     + symmetric_kl(k1, q2, self.bank, self.tau)).mean(),
        "cs": (0.5 * negative_cosine(p[:b], z[2])
               + 0.5 * negative_cosine(p[b:], z[1])).mean(),
    }
    loss = terms["nce"] + self.alpha * terms["kl"] + self.beta * terms["cs"]
    return loss, terms, k2

  def __call__(self, views: torch.Tensor) -> torch.Tensor:
    """Forward, backward, SGD, momentum update and enqueue; returns the loss."""
    self.optimizer.zero_grad(set_to_none=True)
    loss, _, k2 = self._losses(views)
    loss.backward()
    self.optimizer.step()
    with torch.no_grad():
      # θ_m <- θ_m + (1 - m)(θ - θ_m) = m θ_m + (1 - m) θ (eq. 5).
      # pylint: disable-next=protected-access
      torch._foreach_lerp_(self.target, self.online, 1.0 - self.m)
      b = k2.shape[0]
      self.bank[self.ptr:self.ptr + b] = k2
      self.ptr = (self.ptr + b) % self.bank.shape[0]
    return loss.detach()

  def load_jax_state(self, state: Any) -> None:
    """Copies a JAX ``TrainState`` of ``dcl_cstp`` (params, stats, momentum, bank)."""
    stats = state.model_state.get("batch_stats", {})
    flax_io.load_flax(self.net, state.params, stats)
    extras = state.extras
    flax_io.load_flax(self.momentum_net, extras["momentum_params"], extras["momentum_stats"])
    self.bank = torch.from_numpy(np.array(extras["bank"], np.float32)).to(self.device)
    self.ptr = int(np.asarray(extras["bank_ptr"]))

