"""LDM stage `filter`: automatic curation of synthetic images (replaces manual curation).

The dual-stream paper picked good synthetic images by hand. This stage scores each one:
  (a) realism: mean distance to its k nearest real images in a feature space (features
      standardized with the real set's mean and std; lower is more realistic);
  (b) memorization: pixel distance (32x32 grey) to its nearest training image. A near-copy
      is closer than the `copy_quantile` quantile of the real images' own leave-one-out
      nearest-neighbour distances, times `copy_factor`, and is always rejected.
Of the rest, the most realistic `keep_fraction` are kept and written to
WORKDIR/images/synthetic/ (an `image_folder` dataset), with scores.csv and a figure.
A method whose synthetic data has another layout overrides `synthetic_source` and
`write_accepted` (DSDM keeps each image's mask).
"""
from __future__ import annotations

import csv
import os

import jax
import numpy as np

from medrep_jax import methods
from medrep_jax.data import arrays, loader, readers
from medrep_jax.eval import figures as fig_lib
from medrep_jax.eval import generative
from medrep_jax.methods import base


def pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """‖a_i − b_j‖² for (N, D) and (M, D), in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def realism_scores(fake: np.ndarray, real: np.ndarray, k: int) -> np.ndarray:
  """Mean Euclidean distance from each fake to its k nearest real features (z-scored)."""
  mu, sd = real.mean(0), real.std(0) + 1e-8
  d = np.sqrt(pairwise_sq_dists((fake - mu) / sd, (real - mu) / sd))
  k = min(k, d.shape[1])
  return np.sort(d, axis=1)[:, :k].mean(1)


def thumbnails(images: np.ndarray, size: int = 32) -> np.ndarray:
  grey = images.mean(-1, keepdims=True)
  small = np.asarray(jax.image.resize(grey, (len(grey), size, size, 1), "linear"))
  return small.reshape(len(small), -1)


def memorization(fake: np.ndarray, real: np.ndarray, *, copy_quantile: float,
                 copy_factor: float) -> tuple[np.ndarray, np.ndarray, float]:
  """(nn pixel distance per fake, index of that nearest real, near-copy threshold)."""
  tf, tr = thumbnails(fake), thumbnails(real)
  d = np.sqrt(pairwise_sq_dists(tf, tr)) / np.sqrt(tf.shape[1])
  nn_idx = d.argmin(1)
  rr = np.sqrt(pairwise_sq_dists(tr, tr)) / np.sqrt(tr.shape[1])
  np.fill_diagonal(rr, np.inf)
  threshold = float(np.quantile(rr.min(1), copy_quantile) * copy_factor)
  return d.min(1), nn_idx, threshold


class FilterStage(base.Task):
  """Scores, filters and writes the accepted synthetic images."""

  # ---- what a method with another synthetic layout overrides (DSDM: image+mask pairs)
  def synthetic_source(self):
    """The synthetic pool: a source with `.paths` or `.image_paths` (an `image_folder`
    here)."""
    return readers.ImageFolder(self.config.synthetic_dir, "all", channels=self.channels)

  def write_accepted(self, records: dict[str, np.ndarray], accepted: np.ndarray) -> None:
    """Writes the accepted records under WORKDIR/images."""
    arrays.write_image_folder(records["image"][accepted], self.workdir / "images")

  def preflight(self, planned):
    """WORKDIR/images/ will hold at most the whole pool."""
    folder = str(self.config.synthetic_dir)
    pool = (planned.get(folder, 0) if base.pending(folder, planned)
            else len(self.synthetic_source()))
    return {str(self.workdir / "images"): pool}

  def feature_net_path(self) -> str:
    c = self.config
    return c.eval.feature_net_path or c.vae_from

  def run(self) -> base.Result:
    c, f, workdir = self.config, self.config.filter, self.workdir
    tfs = self.transforms("train")
    synth_src = self.synthetic_source()
    records = loader.collect(synth_src, tfs)
    fake = records["image"]
    real = loader.collect(self.make_source("train"), tfs, limit=int(f.max_real))["image"]
    net = methods.feature_net(c.eval.feature_net, self.feature_net_path())
    f_fake, f_real = net(fake), net(real)
    realism = realism_scores(f_fake, f_real, int(f.k))
    nn_dist, nn_idx, threshold = memorization(fake, real, copy_quantile=float(f.copy_quantile),
                                              copy_factor=float(f.copy_factor))
    copy = nn_dist < threshold
    order = np.argsort(np.where(copy, np.inf, realism))
    n_keep = min(int(round(float(f.keep_fraction) * len(fake))), int((~copy).sum()))
    accepted = np.zeros(len(fake), bool)
    accepted[order[:n_keep]] = True
    self.write_accepted(records, accepted)
    self._write_scores(workdir / "scores.csv", synth_src, realism, nn_dist, copy, accepted)
    fig = self._figure(workdir, fake, real, realism, nn_dist, nn_idx, copy, accepted)
    result = {"num_synthetic": len(fake), "num_accepted": int(accepted.sum()),
              "num_near_copies": int(copy.sum()), "copy_threshold": threshold,
              "realism_accepted_mean": float(realism[accepted].mean()) if n_keep else float("nan"),
              "realism_rejected_mean": float(realism[~accepted].mean())
              if (~accepted).any() else float("nan")}
    if n_keep >= 2 and len(fake) >= 2:
      result["fd_all"] = generative.fd(f_real, f_fake)
      result["fd_accepted"] = generative.fd(f_real, f_fake[accepted])
    return base.Result(result, {"accepted vs rejected": fig}, [
        f"Feature network: {net.label}.",
        f"Accepted images: `{workdir / 'images'}` (`data.name=image_folder`). "
        f"Scores per image: `scores.csv`."])

  @staticmethod
  def _write_scores(path, source, realism, nn_dist, copy, accepted):
    paths = getattr(source, "paths", None) or source.image_paths
    with open(path, "w", newline="") as fh:
      w = csv.writer(fh)
      w.writerow(["file", "realism_knn_dist", "nn_train_pixel_dist", "near_copy", "accepted"])
      for i in range(len(realism)):
        w.writerow([paths[i], f"{realism[i]:.5f}",
                    f"{nn_dist[i]:.5f}", int(copy[i]), int(accepted[i])])

  @staticmethod
  def _figure(workdir, fake, real, realism, nn_dist, nn_idx, copy, accepted) -> str:
    acc = np.flatnonzero(accepted)[np.argsort(realism[accepted])][:6]
    rej = np.flatnonzero(~accepted)[np.argsort(-np.where(copy[~accepted], np.inf,
                                                         realism[~accepted]))][:6]
    idx = list(acc) + list(rej)
    titles = [f"{'keep' if accepted[i] else ('copy' if copy[i] else 'reject')} "
              f"r={realism[i]:.2f} d={nn_dist[i]:.3f}" for i in idx]
    images = [fake[i] for i in idx] + [real[nn_idx[i]] for i in idx]
    titles += ["nearest train image"] * len(idx)
    path = fig_lib.image_grid(np.stack(images), workdir / "figures" / "filter.png",
                              nrow=max(1, len(idx)), titles=titles)
    return os.path.relpath(path, workdir)
