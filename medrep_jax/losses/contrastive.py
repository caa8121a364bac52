"""Contrastive losses: InfoNCE with a memory bank, symmetric KL, negative cosine, NT-Xent, SupCon.

Shared by `dcl_cstp` (DCL-CsTP eq. 3, 4, 6, 10), `camcontrast` (CAMContrast eq. 5) and the
SimCLR / MoCo-v2 / SimSiam / SupCon baselines (DESIGN.md).

Conventions:
  * Every loss returns a per-example loss vector; reduce it with
    `medrep_jax.losses.segmentation.reduce_batch` (optionally weighted).
  * All math is float32 whatever the input dtype (bf16 activations are upcast), and the
    similarity matmuls use `Precision.HIGHEST` (no TF32/bf16 passes on GPU/TPU; they are
    tiny next to the encoder).
  * Inputs are global arrays. Under `jax.jit` with the batch sharded on the "data" mesh axis
    these plain `jnp` ops are partitioned by XLA, which inserts the collectives (e.g. the
    all-gather that the (2B, 2B) NT-Xent similarity matrix needs).
  * Stop-gradients: `negative_cosine` / `simsiam_loss` stop the target side themselves
    (it is part of eq. 6). `info_nce_with_bank` and `symmetric_kl` do NOT stop the
    positive/momentum side: in MoCo-style training it comes from the momentum encoder,
    whose parameters are not differentiated, and the caller wraps it in
    `jax.lax.stop_gradient` where it could carry gradients. The bank is always stopped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# DCL-CsTP does not state τ; it follows MoCo [19] for its schedule, with MoCo-v2-style
# strong augmentation and a non-linear projector, so the default is MoCo v2's τ = 0.2
# (MoCo v1 used 0.07). A config field, not a constant to edit.
DCL_TEMPERATURE = 0.2
# CAMContrast §4: "0.05 is the default temperature used in all experiments" (eq. 5),
# also used for its SimCLR / SupCon baselines.
CAMCONTRAST_TEMPERATURE = 0.05

_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.asarray(x).astype(jnp.float32)


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(‖x‖₂, eps) along the last axis, in float32."""
  x = _f32(x)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _check_pair(a: jnp.ndarray, b: jnp.ndarray, what: str) -> None:
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"{what}: expected two (B, D) arrays of equal shape, got {a.shape} "
                     f"and {b.shape}")


def _bank_logits(x: jnp.ndarray, bank: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """(B, K) similarities x·nᵀ/τ against the (stop-gradient) bank."""
  if bank.ndim != 2 or bank.shape[1] != x.shape[1]:
    raise ValueError(f"bank must be (K, {x.shape[1]}), got {bank.shape}")
  bank = jax.lax.stop_gradient(_f32(bank))
  return jnp.matmul(_f32(x), bank.T, precision=_HIGHEST) / temperature


def info_nce_with_bank(q: jnp.ndarray, k: jnp.ndarray, bank: jnp.ndarray,
                       temperature: float = DCL_TEMPERATURE) -> jnp.ndarray:
  """MoCo InfoNCE with memory-bank negatives (DCL-CsTP eq. 3).

  L_NCE = −log( exp(q·p/τ) / (exp(q·p/τ) + Σ_j exp(q·n_j/τ)) ), i.e. softmax cross-entropy
  over the logits [q·p, q·n_1, ..., q·n_K]/τ with the positive at index 0.

  Args:
    q: (B, D) l2-normalized queries.
    k: (B, D) l2-normalized positive keys (p in eq. 3); the caller stops their gradient
      where they come from a differentiated branch.
    bank: (K, D) l2-normalized negatives (gradient always stopped).
    temperature: τ.

  Returns:
    (B,) float32 per-example loss.
  """
  _check_pair(q, k, "info_nce_with_bank")
  l_pos = jnp.sum(_f32(q) * _f32(k), axis=-1, keepdims=True) / temperature
  logits = jnp.concatenate([l_pos, _bank_logits(q, bank, temperature)], axis=1)
  labels = jnp.zeros((q.shape[0],), jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def bank_diagnostics(q: jnp.ndarray, k: jnp.ndarray, bank: jnp.ndarray) -> dict:
  """Monitors of the instance-discrimination task of eq. 3 (no gradient).

  `pos_cos`: mean cos(q, p) of the positive pairs; `neg_cos`: mean cos(q, n_j) over the
  bank; `top1`: the fraction of queries whose positive outscores every bank key (MoCo's
  "acc@1"; chance is 1/(K+1)). L_NCE can only fall below ln(K+1) when pos_cos rises above
  neg_cos by a margin of order τ.

  Args:
    q, k: (B, D) l2-normalized queries and positive keys.
    bank: (K, D) l2-normalized negatives.
  """
  _check_pair(q, k, "bank_diagnostics")
  q, k, bank = (jax.lax.stop_gradient(_f32(a)) for a in (q, k, bank))
  pos = jnp.sum(q * k, axis=-1)
  neg = _bank_logits(q, bank, 1.0)
  return {"pos_cos": jnp.mean(pos), "neg_cos": jnp.mean(neg),
          "top1": jnp.mean((pos > jnp.max(neg, axis=-1)).astype(jnp.float32))}


def symmetric_kl(p: jnp.ndarray, q: jnp.ndarray, bank: jnp.ndarray,
                 temperature: float = DCL_TEMPERATURE) -> jnp.ndarray:
  """Symmetric KL between bank-similarity distributions (DCL-CsTP eq. 4).

  P = softmax(p·nᵀ/τ) and Q = softmax(q·nᵀ/τ) over the K bank keys; the loss is
  ½·KL(P‖Q) + ½·KL(Q‖P) = ½·Σ_j (P_j − Q_j)(log P_j − log Q_j), computed from
  log-softmax (no log of a softmax, no division).

  Args:
    p: (B, D) l2-normalized momentum-side embeddings. The CALLER applies
      `jax.lax.stop_gradient` (DESIGN.md: the momentum side is stop-gradient); this
      function differentiates through both arguments.
    q: (B, D) l2-normalized query embeddings.
    bank: (K, D) l2-normalized keys (gradient always stopped).
    temperature: τ, shared with eq. 3 by default.

  Returns:
    (B,) float32 per-example loss, ≥ 0, zero iff P == Q.
  """
  _check_pair(p, q, "symmetric_kl")
  log_p = jax.nn.log_softmax(_bank_logits(p, bank, temperature), axis=-1)
  log_q = jax.nn.log_softmax(_bank_logits(q, bank, temperature), axis=-1)
  return 0.5 * jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1)


def negative_cosine(q: jnp.ndarray, p: jnp.ndarray) -> jnp.ndarray:
  """−cos(q, stop_gradient(p)) per example (SimSiam's D; one term of DCL-CsTP eq. 6).

  Args:
    q: (B, D) predictions (any scale; normalized here).
    p: (B, D) targets; their gradient is stopped here.

  Returns:
    (B,) float32 per-example loss in [−1, 1].
  """
  _check_pair(q, p, "negative_cosine")
  target = jax.lax.stop_gradient(_f32(p))
  return -optax.cosine_similarity(_f32(q), target, epsilon=1e-12)


def simsiam_loss(q2: jnp.ndarray, z3: jnp.ndarray, q3: jnp.ndarray,
                 z2: jnp.ndarray) -> jnp.ndarray:
  """L_CS = −½cos(q2, sg(z3)) − ½cos(q3, sg(z2)) (DCL-CsTP eq. 6, SimSiam pairing).

  q_i = h(z_i) are the predictor outputs of views v2, v3 (or z_i themselves with
  `local_predictor=False`), z_i the projections, whose gradient is stopped.

  Returns:
    (B,) float32 per-example loss in [−1, 1].
  """
  return 0.5 * negative_cosine(q2, z3) + 0.5 * negative_cosine(q3, z2)


def _self_masked_logits(z: jnp.ndarray, temperature: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(N, N) cosine logits z_i·z_k/τ and the mask k ≠ i of the denominator terms."""
  z = l2_normalize(z)
  logits = jnp.matmul(z, z.T, precision=_HIGHEST) / temperature
  not_self = ~jnp.eye(z.shape[0], dtype=bool)
  return logits, not_self


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray,
            temperature: float = CAMCONTRAST_TEMPERATURE) -> jnp.ndarray:
  """NT-Xent over the 2B projections (SimCLR; CAMContrast eq. 5).

  With z = [z1; z2] l2-normalized (done here) and j(i) = i ± B the other view of
  example i, ℓ_i = −log( exp(z_i·z_j/τ) / Σ_{k≠i} exp(z_i·z_k/τ) ): the denominator runs
  over all 2B − 1 other projections (positive included, k = i excluded, eq. 5's 𝟙(i≠k)).

  Args:
    z1: (B, D) projections of the first views (CAMContrast: image crops).
    z2: (B, D) projections of the second views (CAMContrast: heatmap crops).
    temperature: τ (CAMContrast: 0.05).

  Returns:
    (2B,) float32 per-example loss, rows ordered [z1 anchors; z2 anchors]. Its mean is
    SimCLR's L = 1/2B Σ_k [ℓ(2k−1, 2k) + ℓ(2k, 2k−1)].
  """
  _check_pair(z1, z2, "nt_xent")
  b = z1.shape[0]
  logits, not_self = _self_masked_logits(jnp.concatenate([z1, z2], axis=0), temperature)
  positives = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(0, b)])
  return optax.softmax_cross_entropy_with_integer_labels(logits, positives, where=not_self)


def supcon(z: jnp.ndarray, labels: jnp.ndarray,
           temperature: float = CAMCONTRAST_TEMPERATURE) -> jnp.ndarray:
  """Supervised contrastive loss L^sup_out (Khosla et al. 2020, eq. 2).

  With z l2-normalized (done here), A(i) = {a ≠ i} and P(i) = {p ∈ A(i): y_p = y_i},
  ℓ_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) ).
  For several views, concatenate them along the batch axis and repeat the labels.

  Args:
    z: (N, D) projections of all views.
    labels: (N,) integer class labels.
    temperature: τ (default: CAMContrast's 0.05, used for its SupCon baselines).

  Returns:
    (N,) float32 per-example loss. An anchor with no positive (|P(i)| = 0) gets 0; to
    leave it out of the mean, reduce with `weights = has_positive(labels)`.
  """
  if z.ndim != 2 or labels.shape != (z.shape[0],):
    raise ValueError(f"supcon: expected z (N, D) and labels (N,), got {z.shape} and "
                     f"{labels.shape}")
  logits, not_self = _self_masked_logits(z, temperature)
  pos = (labels[:, None] == labels[None, :]) & not_self
  pos = pos.astype(jnp.float32)
  targets = pos / jnp.maximum(jnp.sum(pos, axis=1, keepdims=True), 1.0)
  return optax.softmax_cross_entropy(logits, targets, where=not_self)


def has_positive(labels: jnp.ndarray) -> jnp.ndarray:
  """(N,) bool: whether anchor i has another example with its label (SupCon's |P(i)| > 0)."""
  same = labels[:, None] == labels[None, :]
  return jnp.sum(same, axis=1) > 1
