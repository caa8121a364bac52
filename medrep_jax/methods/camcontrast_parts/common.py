"""Pieces the CAMContrast stages share: coarse labels and a CAM generator from a run."""
from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from medrep_jax import methods
from medrep_jax.data import loader
from medrep_jax.models import cam, unet

CLASS_NAMES = ("normal", "abnormal")


def coarse_labels(labels: Any, normal_class: int = 0) -> Any:
  """Normal (0) / abnormal (1) labels (Sec. 4.1: every disease class becomes "abnormal").

  Integer labels (jax or NumPy) become `label != normal_class`; multi-hot (B, K) labels are
  returned as they are (Sec. 4.6: multi-label mode; normal = no positive class).
  """
  if labels.ndim == 2:
    return labels
  if labels.ndim != 1:
    raise ValueError(f"labels must be (B,) class ids or (B, K) multi-hot, got {labels.shape}")
  return (labels != normal_class).astype(np.int32)


def encoder_of(config) -> Any:
  """The encoder a CAMContrast run's `config.model` describes (shared `encoder_from_config`)."""
  return unet.encoder_from_config(config.model, jnp.dtype(config.dtype),
                                  bool(config.get("remat", False)))


def map_fn(encoder, weighted: bool = True) -> Callable:
  """jit((variables, images) -> (logits, CAMs of eq. 1 or unweighted maps))."""
  return jax.jit(lambda v, x: cam.cams_from_variables(encoder, v, x, weighted=weighted))


def load_classifier(run_dir: str | pathlib.Path):
  """A finished stage-1 classifier run, its model rebuilt (`methods.load_trained`)."""
  if not run_dir:
    raise ValueError("classifier_from is empty: point it at a finished camcontrast "
                     "stage=classifier run (in the pipeline: 'stage:classifier')")
  return methods.load_trained(run_dir, method="camcontrast", stage="classifier")


def collect_maps(fn: Callable, variables, source, transforms, *, batch_size: int,
                 limit: int = 0) -> dict[str, np.ndarray]:
  """Images, labels, indices, logits and CAMs of (the first `limit` of) a source.

  Returns:
    {"image": (N, H, W, C) float32 in [0, 1], "label", "index", "logits" (N, C),
     "maps" (N, h, w, C)} as host arrays.
  """
  out: dict[str, list] = {k: [] for k in ("image", "label", "index", "logits", "maps")}
  for b in loader.eval_batches(source, transforms, global_batch=batch_size, max_examples=limit,
                               process_index=0, process_count=1):
    keep = b["_valid"] > 0
    logits, maps = fn(variables, jnp.asarray(b["image"]))
    for key, value in (("image", b["image"]), ("label", b["label"]), ("index", b["index"]),
                       ("logits", logits), ("maps", maps)):
      out[key].append(np.asarray(value)[keep])
  return {k: np.concatenate(v) for k, v in out.items()}
