"""PNG figures for run reports: overlays, confusion matrices, grids, curves.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no
global state), so it is safe in headless runs and threads. Every function
creates the parent folder, writes a PNG at ``dpi`` (100 by default) and
returns the path as a string.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CELL = 1.6  # inches per image cell


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=dpi, format="png")
  return path


def to_display(image: np.ndarray, value_range: tuple[float, float] | None = None
               ) -> np.ndarray:
  """One image scaled to [0, 1]: min-max, or (x - lo) / (hi - lo) clipped for
  `value_range` (lo, hi), e.g. an HU window; (H, W, 1) -> (H, W); >3 channels keep 3."""
  x = np.asarray(image, np.float64)
  if x.ndim == 3:
    x = x[..., 0] if x.shape[-1] in (1, 2) else x[..., :3]
  lo, hi = value_range if value_range is not None else (np.nanmin(x), np.nanmax(x))
  return np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)


def _class_colors(num: int) -> np.ndarray:
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps["tab10"]
  return np.array([cmap((k - 1) % 10)[:3] for k in range(num)])


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
  """RGB image with classes > 0 alpha-filled and their boundaries drawn opaque."""
  rgb = to_display(image)
  if rgb.ndim == 2:
    rgb = np.repeat(rgb[..., None], 3, axis=-1)
  mask = np.asarray(mask).astype(np.int64)
  colors = _class_colors(int(mask.max()) + 1 if mask.size else 1)
  out = rgb.copy()
  fg = mask > 0
  out[fg] = (1 - alpha) * rgb[fg] + alpha * colors[mask[fg]]
  edge = np.zeros_like(fg)
  rows, cols = mask[1:, :] != mask[:-1, :], mask[:, 1:] != mask[:, :-1]
  edge[1:, :] |= rows
  edge[:-1, :] |= rows
  edge[:, 1:] |= cols
  edge[:, :-1] |= cols
  edge &= fg
  out[edge] = colors[mask[edge]]
  return out


def segmentation_overlay_grid(images: np.ndarray, true_masks: np.ndarray,
                              pred_masks: np.ndarray, path: str | os.PathLike,
                              max_items: int = 8, title: str | None = None,
                              dpi: int = 100) -> str:
  """Three rows: image / ground truth overlaid / prediction overlaid.

  Args:
    images: (N, H, W, C) or (N, H, W), any range (each is min-max normalized).
    true_masks, pred_masks: (N, H, W) integer masks, 0 = background.
    path: output PNG path.
    max_items: at most this many columns (the first items).
    title: optional figure title.
    dpi: resolution.
  """
  n = min(len(images), max_items)
  fig = Figure(figsize=(_CELL * n, _CELL * 3 + (0.4 if title else 0)))
  axes = fig.subplots(3, n, squeeze=False)
  for j in range(n):
    rows = [to_display(images[j]), overlay_mask(images[j], true_masks[j]),
            overlay_mask(images[j], pred_masks[j])]
    for i, (img, label) in enumerate(zip(rows, ("image", "ground truth", "prediction"))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(label, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path, dpi)


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str],
                            path: str | os.PathLike, normalize: bool = False,
                            title: str | None = None, dpi: int = 100) -> str:
  """Heatmap of a (K, K) confusion matrix (rows true, columns predicted) with counts."""
  cm = np.asarray(cm, np.float64)
  shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
  k = cm.shape[0]
  side = max(4.0, 0.55 * k + 2.0)
  fig = Figure(figsize=(side, side))
  ax = fig.subplots()
  im = ax.imshow(shown, cmap="Blues")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(k), labels=list(class_names), fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  thresh = shown.max() / 2 if shown.size else 0
  if k <= 20:
    for i in range(k):
      for j in range(k):
        text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
        ax.text(j, i, text, ha="center", va="center", fontsize=7,
                color="white" if shown[i, j] > thresh else "black")
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path, dpi)


def image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8,
               titles: Sequence[str] | None = None, dpi: int = 100,
               value_ranges: Sequence[tuple[float, float] | None] | None = None) -> str:
  """Grid of images with ``nrow`` images per row (torchvision's convention).

  ``images`` is (N, H, W, C) or (N, H, W), any range; each is min-max normalized for
  display, or scaled by its (lo, hi) in ``value_ranges`` (one per image; None: min-max).
  """
  n = len(images)
  cols = max(1, min(nrow, n))
  rows = max(1, math.ceil(n / cols))
  fig = Figure(figsize=(_CELL * cols, _CELL * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for idx, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if idx < n:
      img = to_display(images[idx], None if value_ranges is None else value_ranges[idx])
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
      if titles is not None:
        ax.set_title(str(titles[idx]), fontsize=7)
  fig.tight_layout()
  return _save(fig, path, dpi)


def curve_figure(x: Sequence[float], ys: Mapping[str, Sequence[float]],
                 path: str | os.PathLike, xlabel: str = "step", ylabel: str = "value",
                 title: str | None = None, logy: bool = False, dpi: int = 100) -> str:
  """Line plot of one or more named series against ``x`` (e.g. loss curves)."""
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for name, y in ys.items():
    ax.plot(np.asarray(x)[:len(y)], np.asarray(y), label=name, linewidth=1.2)
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  if ys:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path, dpi)


def curve_panels_figure(panels: Mapping[str, Mapping[str, tuple[Sequence[float],
                                                                  Sequence[float]]]],
                        path: str | os.PathLike, xlabel: str = "step",
                        hlines: Mapping[str, float] | None = None, dpi: int = 100) -> str:
  """One panel per quantity, one line per run, each with its own x (runs of different
  lengths): panels = {panel title: {run label: (x, y)}}; `hlines` = {panel title: y} draws
  a dashed reference (e.g. the chance level ln(K + 1) of InfoNCE)."""
  n = max(1, len(panels))
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  labels = list(dict.fromkeys(l for series in panels.values() for l in series))
  palette = _class_colors(len(labels))  # one colour per run in every panel
  for ax, (title, series) in zip(axes, panels.items()):
    for label, (x, y) in series.items():
      ax.plot(np.asarray(x), np.asarray(y), label=label, linewidth=1.2,
              color=palette[labels.index(label)])
    if hlines and title in hlines:
      ax.axhline(hlines[title], color="k", linestyle="--", linewidth=0.8, label="chance")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.tight_layout()
  return _save(fig, path, dpi)


def heatmap_overlay_grid(images: np.ndarray, heatmaps: Mapping[str, np.ndarray],
                         path: str | os.PathLike, titles: Sequence[str] | None = None,
                         alpha: float = 0.5, title: str | None = None, dpi: int = 100) -> str:
  """Rows: the images, then one row per named heatmap set overlaid on them (e.g. CAMs).

  Heatmaps in [0, 1] at any resolution (e.g. feature-map size) are stretched over the
  image with bilinear interpolation and the "jet" colormap on the fixed range [0, 1], so a
  suppressed (zeroed) heatmap shows as uniformly blue, not re-normalized.

  Args:
    images: (N, H, W, C) or (N, H, W), any range (each is min-max normalized).
    heatmaps: {row label: (N, h, w) heatmaps}.
    path: output PNG path.
    titles: optional column titles (e.g. "normal", "abnormal").
    alpha: heatmap opacity.
    title: optional figure title.
    dpi: resolution.
  """
  n = len(images)
  rows = [("image", None)] + list(heatmaps.items())
  fig = Figure(figsize=(_CELL * n, _CELL * len(rows) + (0.4 if title else 0)))
  axes = fig.subplots(len(rows), n, squeeze=False)
  for i, (label, maps) in enumerate(rows):
    for j in range(n):
      ax = axes[i, j]
      img = to_display(images[j])
      h, w = img.shape[:2]
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
      if maps is not None:
        ax.imshow(np.asarray(maps[j], np.float64), cmap="jet", alpha=alpha, vmin=0, vmax=1,
                  extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(label, fontsize=8)
      if i == 0 and titles is not None:
        ax.set_title(str(titles[j]), fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path, dpi)


VOLUME_VIEWS = ("axial", "coronal", "sagittal")


def volume_views_figure(volumes: np.ndarray, heatmaps: np.ndarray | None,
                        path: str | os.PathLike, at: str = "middle",
                        names: Sequence[str] | None = None, alpha: float = 0.5,
                        title: str | None = None, dpi: int = 100) -> str:
  """Axial, coronal and sagittal slices of each volume with its heatmap overlaid.

  Three columns per volume: the slices at fixed D (axial: H x W), fixed H (coronal:
  D x W) and fixed W (sagittal: D x H), in stored orientation (rows of the coronal and
  sagittal views run along D), drawn by `heatmap_overlay_grid` (a row of images, then
  a row of overlays on the fixed [0, 1] range).

  Args:
    volumes: (N, D, H, W) or (N, D, H, W, C), any range (each slice is min-max normalized).
    heatmaps: (N, d, h, w) heatmaps in [0, 1] at any resolution (e.g. a 3-D CAM), or None
      for the slices alone.
    path: output PNG path.
    at: "middle" (the middle slice on each axis) or "peak" (the slices through the
      heatmap maximum, the middle for a constant heatmap).
    names: optional names of the volumes (column titles).
    alpha, title, dpi: as `heatmap_overlay_grid`.
  """
  if at not in ("middle", "peak"):
    raise ValueError(f"at={at!r}; expected 'middle' or 'peak'")
  images, maps, titles = [], [], []
  for i, vol in enumerate(volumes):
    vol = np.asarray(vol)
    shape = vol.shape[:3]
    heat = None if heatmaps is None else np.asarray(heatmaps[i], np.float64)
    centre = [n // 2 for n in shape]
    if at == "peak" and heat is not None and heat.max() > heat.min():
      peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
      centre = [min(int((p + 0.5) * n / m), n - 1) for p, n, m in zip(peak, shape, heat.shape)]
    for axis, view in enumerate(VOLUME_VIEWS):
      images.append(np.take(vol, centre[axis], axis=axis))
      if heat is not None:
        cell = min(centre[axis] * heat.shape[axis] // shape[axis], heat.shape[axis] - 1)
        maps.append(np.take(heat, cell, axis=axis))
      name = names[i] if names is not None else f"#{i}"
      titles.append(f"{name} {view} {centre[axis]}")
  return heatmap_overlay_grid(images, {"heatmap": maps} if heatmaps is not None else {},
                              path, titles=titles, alpha=alpha, title=title, dpi=dpi)


def paired_bar_figure(groups: Mapping[str, Mapping[str, Sequence[float]]],
                      series: Sequence[str], path: str | os.PathLike,
                      title: str | None = None, ylabel: str = "value", dpi: int = 100,
                      errors: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                      value_labels: bool = True) -> str:
  """Grouped bars for comparing runs: one panel per group, a cluster per metric, a bar per run.

  Args:
    groups: panel title -> {metric -> one value per series (in `series` order)}.
    series: the legend names of the bars (e.g. "pretrained", "random init").
    path: output PNG.
    errors: error-bar half widths (e.g. std), shaped like `groups`.
    value_labels: print each bar's value on it.
  """
  fig = Figure(figsize=(3.2 * max(len(groups), 1) + 0.6, 3.4))
  axes = np.atleast_1d(fig.subplots(1, max(len(groups), 1)))
  for ax, (name, metrics) in zip(axes, groups.items()):
    labels = list(metrics)
    values = np.asarray([metrics[k] for k in labels], np.float64).reshape(len(labels), -1)
    err = (np.asarray([errors[name][k] for k in labels], np.float64).reshape(values.shape)
           if errors else None)
    width = 0.8 / max(values.shape[1], 1)
    for j in range(values.shape[1]):
      pos = np.arange(len(labels)) + (j - (values.shape[1] - 1) / 2) * width
      bars = ax.bar(pos, values[:, j], width, label=series[j],
                    yerr=None if err is None else err[:, j], capsize=2)
      if value_labels:
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set_title(name, fontsize=10)
    low = np.nanmin(values)
    ax.set_ylim(low - 0.1 if low < 0 else 0.0, 1.12)  # CCCs may be negative
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel(ylabel)
  handles, names = axes[0].get_legend_handles_labels()
  fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10, y=0.995)
  fig.tight_layout(rect=(0, 0, 1, 0.92))
  return _save(fig, path, dpi)


def probe_heatmap_figure(grid: np.ndarray, blocks: Sequence[str], timesteps: Sequence[float],
                         path: str | os.PathLike, title: str | None = None,
                         label: str = "mIoU", dpi: int = 100) -> str:
  """Heatmap of probe scores over decoder blocks x diffusion timesteps (DSDM Fig. 3).

  Args:
    grid: (len(blocks), len(timesteps)) scores, e.g. ``feature_probe.probe_grid``'s
      test mIoU; NaN cells are left blank and annotated "-".
    blocks: row labels (y axis).
    timesteps: column labels (x axis).
    path: output PNG path.
    title: optional axes title.
    label: colorbar label.
    dpi: resolution.

  Returns:
    The path written.
  """
  grid = np.asarray(grid, np.float64)
  if grid.shape != (len(blocks), len(timesteps)):
    raise ValueError(f"grid must be (len(blocks), len(timesteps)) = "
                     f"({len(blocks)}, {len(timesteps)}); got {grid.shape}")
  rows, cols = grid.shape
  fig = Figure(figsize=(max(4.0, 0.6 * cols + 2.2), max(3.0, 0.4 * rows + 1.6)))
  ax = fig.subplots()
  finite = grid[np.isfinite(grid)]
  lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=lo,
                 vmax=hi if hi > lo else lo + 1e-6)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(label)
  ax.set_xticks(range(cols), labels=[str(t) for t in timesteps], fontsize=8)
  ax.set_yticks(range(rows), labels=[str(b) for b in blocks], fontsize=8)
  ax.set_xlabel("diffusion timestep t")
  ax.set_ylabel("block")
  mid = (lo + hi) / 2
  for i in range(rows):
    for j in range(cols):
      v = grid[i, j]
      ax.text(j, i, f"{v:.2f}" if np.isfinite(v) else "-", ha="center", va="center",
              fontsize=7, color="white" if np.isfinite(v) and v <= mid else "black")
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path, dpi)


def embedding_figure(points2d: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                     path: str | os.PathLike, title: str | None = None,
                     dpi: int = 100) -> str:
  """Scatter of a 2-D embedding (e.g. t-SNE of frozen features), coloured by label.

  Args:
    points2d: (N, 2) map coordinates.
    labels: (N,) integer labels; class k is named ``class_names[k]`` in the legend
      (``str(k)`` when the list is short).
    class_names: names of the classes.
    path: output PNG path.
    title: optional axes title.
    dpi: resolution.
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  pts = np.asarray(points2d, np.float64)
  labels = np.asarray(labels).astype(np.int64).ravel()
  if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) != len(labels):
    raise ValueError(f"expected (N, 2) points and (N,) labels; got {pts.shape}, "
                     f"{labels.shape}")
  present = np.unique(labels)
  num = int(present.max()) + 1 if present.size else 1
  cmap = colormaps["tab10" if num <= 10 else "tab20"]
  size = float(np.clip(3000.0 / max(len(pts), 1), 3.0, 30.0))
  fig = Figure(figsize=(6.0, 5.0))
  ax = fig.subplots()
  for k in present:
    sel = labels == k
    name = class_names[k] if k < len(class_names) else str(k)
    ax.scatter(pts[sel, 0], pts[sel, 1], s=size, color=cmap(int(k) % cmap.N),
               label=f"{name} ({int(sel.sum())})", alpha=0.8, linewidths=0)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=7, markerscale=max(1.0, 20.0 / size) ** 0.5, loc="best", frameon=True)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path, dpi)
