"""DCL-CsTP: dual-stream contrastive pretraining with cross-scale token projection.

Dual-stream paper, Section III (eq. 3-10):
  - global stream (MoCo-style): q = T(F(v1)), p = T_m(F_m(v2)), symmetrized by swapping v1
    and v2; L_NCE is InfoNCE against a memory bank of K keys (eq. 3) and L_KL the symmetric
    KL between P(p, n) and Q(q, n) over the bank (eq. 4); F_m, T_m follow F, T with
    momentum m (eq. 5), as explicit train-state fields updated by optax.incremental_update;
  - local stream (SimSiam-style, eq. 6): z_i = T(F(v_i)) for v2, v3, q_i = h(z_i),
    L_CS = -½cos(q2, sg(z3)) - ½cos(q3, sg(z2)) (`local_predictor=False`: no h);
  - total (eq. 10): L = L_NCE + α·L_KL + β·L_CS.
The three strong-augmented views are made on device inside the step and run through the
encoder as one batch. The bank receives the momentum keys of v2 (B keys per step), so K
must be a multiple of the global batch. The bank is sharded along K over the "data" axis; each device
enqueues its own keys into its own shard (`memory_bank.enqueue_sharded`).

Baselines and ablations are the same code with other switches (see configs/dcl_cstp.py):
SimCLR (`loss.nt_xent`), MoCo-v2 (`global_stream="moco"`), SimSiam (local stream only),
w/o global, w/o local, MLP projector, standard attention.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medrep_jax.data import augment
from medrep_jax.losses import contrastive as cl
from medrep_jax.methods import base
from medrep_jax.methods import ssl_base
from medrep_jax.models import heads, unet
from medrep_jax.core import memory_bank


class ContrastiveNet(nn.Module):
  """Encoder F (named `encoder`, as fine-tuning expects), projector T, predictor h."""
  encoder: nn.Module
  projector: nn.Module
  predictor: nn.Module | None = None

  def embed(self, x: jax.Array, train: bool) -> jax.Array:
    """z = T(F(x)), float32 (B, D)."""
    return self.projector(self.encoder(x, train), train)

  def features(self, x: jax.Array) -> jax.Array:
    """Pooled encoder features for monitors and downstream probes."""
    return self.encoder(x, False)["pooled"].astype(jnp.float32)

  def embed_and_predict(self, x: jax.Array, train: bool, num_views: int):
    """(z for every view, h(z) for the last two views or None): one apply, so every
    BatchNorm (the predictor's too) sees its own running statistics."""
    z = self.embed(x, train)
    if self.predictor is None:
      return z, None
    local = z.reshape(num_views, -1, z.shape[-1])[-2:]
    return z, self.predictor(local.reshape(-1, z.shape[-1]), train)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    z = self.embed(x, train)
    return self.predictor(z, train) if self.predictor is not None else z


class DCLCsTP(ssl_base.PretrainMethod):
  """The dual-stream step and its baselines."""

  def __init__(self, config, workdir=None, mesh=None):
    super().__init__(config, workdir, mesh)
    # The view policy's arguments (`augment.strong`), checked now rather than mid-step.
    self.augment_kwargs = augment.policy_kwargs(config.augment)

  @functools.cached_property
  def model(self) -> ContrastiveNet:
    c, m = self.config, self.config.model
    encoder = unet.encoder_from_config(m, jnp.dtype(c.dtype), c.get("remat", False))
    if m.projector == "cstp":
      projector = heads.make_projector("cstp", embed_dim=int(m.cstp_width),
                                       out_dim=int(m.embed_dim), num_heads=int(m.cstp_heads),
                                       attention=m.attention, dtype=jnp.dtype(c.dtype))
    else:
      projector = heads.make_projector("mlp", hidden_dim=int(m.mlp_hidden),
                                       out_dim=int(m.embed_dim), dtype=jnp.dtype(c.dtype))
    predictor = None
    if self.uses_predictor:
      predictor = heads.SimSiamPredictor(hidden_dim=int(m.predictor_hidden),
                                         out_dim=int(m.embed_dim), dtype=jnp.dtype(c.dtype))
    return ContrastiveNet(encoder=encoder, projector=projector, predictor=predictor)

  @property
  def uses_bank(self) -> bool:
    return self.config.loss.global_stream in ("dual", "moco")

  @property
  def uses_predictor(self) -> bool:
    return self.config.loss.local_stream == "simsiam" and bool(self.config.loss.local_predictor)

  @property
  def num_views(self) -> int:
    l = self.config.loss
    both = self.uses_bank and l.local_stream != "none"
    return 3 if both else 2

  # ---- state
  def init_variables(self, rng, batch):
    return self.model.init(jax.random.split(rng)[0], batch["image"], train=False)

  def init_extras(self, rng, batch, params, model_state):
    """F_m, T_m (eq. 5) start as copies of F, T; the bank starts as random unit keys."""
    if not self.uses_bank:
      return {}
    online = {k: params[k] for k in ("encoder", "projector")}
    stats = {k: v for k, v in model_state.get("batch_stats", {}).items()
             if k in ("encoder", "projector")}
    bank, ptr = memory_bank.init_bank(jax.random.split(rng)[1], self.bank_size,
                                      int(self.config.model.embed_dim))
    return {"momentum_params": online, "momentum_stats": stats, "bank": bank,
            "bank_ptr": ptr}

  def state_shardings(self, abstract_state, mesh):
    shardings = super().state_shardings(abstract_state, mesh)
    if self.uses_bank:
      extras = dict(shardings.extras, bank=memory_bank.bank_sharding(mesh))
      shardings = shardings.replace(extras=extras)
    return shardings

  @property
  def bank_size(self) -> int:
    """K: `loss.bank_size`, or what `check_data` fitted to the data (`loss.bank_auto`)."""
    return int(getattr(self, "_bank_size", None) or self.config.loss.bank_size)

  def check_data(self, train_size: int, announce: bool = True) -> None:
    """The bank against the data: with `loss.bank_auto`, K shrinks to the largest valid
    size the data hold (the paper's K = 4,096 needs 4,096+ images); otherwise a K that
    cannot fit raises ConfigError."""
    if not self.uses_bank:
      return
    l, batch = self.config.loss, int(self.config.train.batch_size)
    devices = self.mesh.shape["data"] if self.mesh else 1
    k = int(l.bank_size)
    if l.get("bank_auto", False):
      k = memory_bank.fit_bank(k, batch, train_size, devices)
      if k != int(l.bank_size) and announce:
        print(f"memory bank: K={k} keys (loss.bank_size={int(l.bank_size)} does not fit "
              f"{train_size} training examples; loss.bank_auto=True picks the largest "
              f"multiple of the batch {batch} that does)")
    memory_bank.check_bank(k, batch, train_size, devices)
    self._bank_size = k

  def check_planned(self, train_size: int) -> None:
    super().check_planned(train_size)
    self.check_data(train_size, announce=False)  # an upper bound: a misfit fails in training too

  # ---- step
  def _momentum_embed(self, extras, x):
    variables = {"params": extras["momentum_params"], "batch_stats": extras["momentum_stats"]}
    z, updates = self.model.apply(variables, x, True, method=ContrastiveNet.embed,
                                mutable=["batch_stats"])
    return jax.lax.stop_gradient(cl.l2_normalize(z)), updates.get("batch_stats", {})

  def train_step(self, state, batch, rng):
    c, l = self.config, self.config.loss
    views = augment.make_views(rng, batch["image"], c.augment.policy, self.num_views,
                               indices=batch["index"], out_size=int(c.data.image_size),
                               **self.augment_kwargs)
    v, b = views.shape[0], views.shape[1]
    extras = state.extras
    if self.uses_bank:
      k1, stats1 = self._momentum_embed(extras, views[0])
      k2, stats2 = self._momentum_embed({**extras, "momentum_stats": stats1}, views[1])
    else:
      k1 = k2 = stats2 = None

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      flat = views.reshape((v * b,) + views.shape[2:])
      (z, p), updates = self.model.apply(variables, flat, True, v,
                                       method=ContrastiveNet.embed_and_predict,
                                       mutable=["batch_stats"])
      z = z.reshape(v, b, -1)
      terms, monitors = {}, {}
      if self.uses_bank:  # global stream, eq. 3-4, symmetrized over (v1, v2)
        q1, q2 = cl.l2_normalize(z[0]), cl.l2_normalize(z[1])
        bank = extras["bank"]
        nce = 0.5 * (cl.info_nce_with_bank(q1, k2, bank, l.temperature)
                     + cl.info_nce_with_bank(q2, k1, bank, l.temperature))
        terms["nce"] = jnp.mean(nce)
        monitors.update({f"global/{k}": x for k, x in
                         cl.bank_diagnostics(q1, k2, bank).items()})
        if l.global_stream == "dual":
          kl = 0.5 * (cl.symmetric_kl(k2, q1, bank, l.temperature)
                      + cl.symmetric_kl(k1, q2, bank, l.temperature))
          terms["kl"] = jnp.mean(kl)
      if l.local_stream == "simsiam":  # local stream, eq. 6, on the last two views
        za, zb = z[-2], z[-1]
        pa, pb = (p[:b], p[b:]) if p is not None else (za, zb)
        terms["cs"] = jnp.mean(cl.simsiam_loss(pa, zb, pb, za))
      if l.nt_xent:
        terms["nt_xent"] = jnp.mean(cl.nt_xent(z[0], z[1], l.nt_xent_temperature))
      loss = (terms.get("nce", 0.0) + float(l.alpha) * terms.get("kl", 0.0)
              + float(l.beta) * terms.get("cs", 0.0) + terms.get("nt_xent", 0.0))
      return loss, {"metrics": {**{f"loss/{k}": t for k, t in terms.items()}, **monitors},
                    "updates": updates}

    state, metrics, _ = base.gradient_step(state, loss_fn)
    if self.uses_bank:  # eq. 5 momentum update, then enqueue this step's keys
      online = {k: state.params[k] for k in ("encoder", "projector")}
      mom = optax.incremental_update(online, extras["momentum_params"],
                                     step_size=1.0 - float(l.momentum))
      bank, ptr = memory_bank.enqueue_sharded(extras["bank"], extras["bank_ptr"], k2, self.mesh)
      state = state.replace(extras={"momentum_params": mom, "momentum_stats": stats2,
                                    "bank": bank, "bank_ptr": ptr})
    return state, metrics


STAGES = {"pretrain": DCLCsTP}
