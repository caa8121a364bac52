"""Aggregates a sweep's runs into ROOT/sweep.md, ROOT/sweep.csv and ROOT/sweep_groups.csv.

Each run's final metrics come from its `done.json` (a finished run) or, for a run still
going or stopped, from the last value of each metric in its `metrics.jsonl` (train metrics
get a `train/` prefix, as in done.json). A pipeline run (config.json lists `stages`) gets
each stage's metrics under a `<stage>/` prefix. Sweep keys whose last part is `seed` are
collapsed: runs equal in every other key form a group, reported as mean ± std (sample
standard deviation, ddof=1) over the seeds. When the sweep was selected on
(`launch/sweep_select.py`, ROOT/selection.json), sweep.md ends with the chosen point of
every group, its validation score and its test-split metrics, and every candidate's score.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
import pathlib
from typing import Any

import numpy as np

from medrep_jax import config_lib
from medrep_jax.train.report import fmt

DEFAULT_COLUMNS = ("*step", "*train/loss", "*eval/*")
SPEC_FILE = "sweep.json"
SELECTION_FILE = "selection.json"  # written by launch/sweep_select.py


def _number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line still being written
      pass
  return rows


def _from_metrics(path: pathlib.Path) -> dict[str, float]:
  """The last value of every metric in a metrics.jsonl (done.json's naming)."""
  out: dict[str, float] = {}
  for row in _read_jsonl(path):
    prefix = "train/" if row.get("split") == "train" else ""
    for key, value in row.items():
      if key not in ("step", "split") and _number(value) and not key.startswith("time/"):
        out[prefix + key] = value
    if "step" in row:
      out["step"] = max(int(row["step"]), int(out.get("step", 0)))
  return out


def run_metrics(run_dir: pathlib.Path) -> tuple[str, dict[str, float]]:
  """(status, final metrics) of one run: status is done, running (partial) or missing."""
  done = run_dir / "done.json"
  if done.exists():
    return "done", {k: v for k, v in json.loads(done.read_text()).items() if _number(v)}
  if (run_dir / "metrics.jsonl").exists():
    return "running", _from_metrics(run_dir / "metrics.jsonl")
  cfg = run_dir / "config.json"
  stages = json.loads(cfg.read_text()).get("stages") if cfg.exists() else None
  if not stages:
    return "missing", {}
  metrics, statuses = {}, []
  for stage in stages:
    status, values = run_metrics(run_dir / stage)
    statuses.append(status)
    metrics.update({f"{stage}/{k}": v for k, v in values.items()})
  status = "done" if all(s == "done" for s in statuses) else (
      "missing" if all(s == "missing" for s in statuses) else "running")
  return status, metrics


def _runs_of(root: pathlib.Path) -> tuple[list[str], list[tuple[str, dict]]]:
  """(sweep keys, [(run name, values)]) from sweep.json, else from the run folder names."""
  spec = root / SPEC_FILE
  if spec.exists():
    data = json.loads(spec.read_text())
    return list(data["keys"]), [(r["name"], r["values"]) for r in data["runs"]]
  runs, keys = [], []
  for d in sorted(p for p in root.iterdir() if p.is_dir()):
    if not any((d / f).exists() for f in ("done.json", "metrics.jsonl", "config.json")):
      continue
    texts: dict[str, str] = {}
    for part in d.name.split(","):
      if "=" in part or not texts:
        key, _, text = part.partition("=")
        texts[key] = text
      else:  # a value that held a comma, e.g. a tuple
        texts[key] += "," + part
    keys += [k for k in texts if k not in keys]
    runs.append((d.name, {k: config_lib.parse_value(t) for k, t in texts.items()}))
  if not runs:
    raise FileNotFoundError(f"{root} holds no {SPEC_FILE} and no run folders")
  return keys, runs


def collect(root: str | pathlib.Path) -> tuple[list[str], list[dict]]:
  """(sweep keys, rows): one row per run with name, values, status and metrics."""
  root = pathlib.Path(root)
  keys, runs = _runs_of(root)
  rows = []
  for name, values in runs:
    status, metrics = run_metrics(root / name)
    rows.append(dict(name=name, values=values, status=status, metrics=metrics))
  return keys, rows


def select_columns(rows: list[dict], patterns=DEFAULT_COLUMNS) -> list[str]:
  """Metric names matching any glob in `patterns`, in pattern order, then sorted."""
  names = sorted({k for r in rows for k in r["metrics"]})
  out = []
  for pattern in patterns:
    out += [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in out]
  return out


def is_seed_key(key: str) -> bool:
  return key.rsplit(".", 1)[-1] == "seed"


def group_over_seeds(keys: list[str], rows: list[dict], columns: list[str]) -> list[dict]:
  """Groups rows equal in every non-seed key: {values, n, stats: {col: (mean, std, count)}}.

  Only finished runs count (`n` is how many): a running run's metrics are from an earlier
  step and would mix into the mean.
  """
  others = [k for k in keys if not is_seed_key(k)]
  groups: dict[str, dict] = {}
  for row in rows:
    if row["status"] != "done":
      continue
    ident = json.dumps([row["values"].get(k) for k in others])
    group = groups.setdefault(ident, dict(values={k: row["values"].get(k) for k in others},
                                          rows=[]))
    group["rows"].append(row)
  out = []
  for group in groups.values():
    stats = {}
    for col in columns:
      vals = [r["metrics"][col] for r in group["rows"] if col in r["metrics"]]
      vals = np.asarray([v for v in vals if math.isfinite(v)], np.float64)
      if vals.size:
        std = float(np.std(vals, ddof=1)) if vals.size > 1 else 0.0
        stats[col] = (float(np.mean(vals)), std, int(vals.size))
    out.append(dict(values=group["values"], n=len(group["rows"]), stats=stats))
  return out


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in body]


def _mean_std(stat) -> str:
  if stat is None:
    return "-"
  mean, std, count = stat
  return fmt(mean) if count == 1 else f"{fmt(mean)} ± {std:.2g}"


def render(root: pathlib.Path, keys: list[str], rows: list[dict], columns: list[str],
           groups: list[dict] | None) -> str:
  """The markdown of sweep.md."""
  body = [[r["name"], *(str(r["values"].get(k, "")) for k in keys), r["status"],
           *(fmt(r["metrics"][c]) if c in r["metrics"] else "-" for c in columns)]
          for r in rows]
  done = sum(r["status"] == "done" for r in rows)
  lines = [f"# Sweep {root}", "", f"{len(rows)} runs, {done} done.", "", "## Runs", ""]
  lines += _md_table(["run", *keys, "status", *columns], body)
  if groups is not None:
    others = [k for k in keys if not is_seed_key(k)]
    seeds = ", ".join(k for k in keys if is_seed_key(k))
    lines += ["", f"## Mean ± std over {seeds}", ""]
    gbody = [[*(str(g["values"][k]) for k in others), str(g["n"]),
              *(_mean_std(g["stats"].get(c)) for c in columns)] for g in groups]
    lines += _md_table([*others, "n", *columns], gbody)
  return "\n".join(lines) + "\n"


_MODE_WORDS = {"max": "maximum", "min": "minimum"}


def _values_text(values: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def render_selection(selection: dict) -> list[str]:
  """Markdown lines of a selection (ROOT/selection.json): the chosen point per group with
  its validation score and test metrics (mean ± std over seeds), then every candidate."""
  by, split = selection["by"], selection["test_split"]
  choices = selection["choices"]
  tested = sorted({k for c in choices for k in c.get("test", {})},
                  key=lambda k: (k.rsplit("/", 1)[-1] != by.rsplit("/", 1)[-1], k))
  lines = ["", f"## Selection on `{by}` ({_MODE_WORDS[selection['mode']]} over "
           f"{', '.join(selection['over']) or 'the runs'}; validation metrics only)", "",
           f"The chosen point of every group, its validation score (mean over its finished "
           f"seeds) and its `{split}`-split metrics (mean ± std over the chosen runs; "
           f"evaluated after the choice, which never reads them).", ""]
  body = [[_values_text(c["fixed"]), _values_text(c["chosen"]), fmt(c["score"]),
           str(len(c["runs"])), *(_mean_std(c.get("test", {}).get(k)) for k in tested)]
          for c in choices]
  lines += _md_table(["group", "chosen", f"val {by}", "n", *(f"{split} {k}" for k in tested)],
                     body)
  lines += ["", "Candidates:", ""]
  body = [[_values_text(c["fixed"]), _values_text(cand["values"]),
           "-" if cand["score"] is None else fmt(cand["score"]), str(cand["n"]),
           "yes" if cand["values"] == c["chosen"] else ""]
          for c in choices for cand in c["candidates"]]
  lines += _md_table(["group", "candidate", f"val {by}", "n", "chosen"], body)
  skipped = [name for c in choices for name in c["skipped"]]
  if skipped:
    lines += ["", f"Not candidates (not finished, or {by} not finite): "
              + ", ".join(f"`{n}`" for n in skipped)]
  return lines


def _write_csv(path: pathlib.Path, header: list[str], body: list[list[Any]]) -> None:
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(body)


def aggregate(root: str | pathlib.Path, patterns=DEFAULT_COLUMNS) -> str:
  """Writes sweep.md, sweep.csv (all metrics) and, with seed keys, sweep_groups.csv.

  Returns:
    The markdown text of sweep.md.
  """
  root = pathlib.Path(root)
  keys, rows = collect(root)
  columns = select_columns(rows, patterns)
  all_metrics = columns + [c for c in select_columns(rows, ("*",)) if c not in columns]
  _write_csv(root / "sweep.csv", ["run", *keys, "status", *all_metrics],
             [[r["name"], *(r["values"].get(k, "") for k in keys), r["status"],
               *(r["metrics"].get(c, "") for c in all_metrics)] for r in rows])
  groups = None
  if any(is_seed_key(k) for k in keys):
    groups = group_over_seeds(keys, rows, columns)
    others = [k for k in keys if not is_seed_key(k)]
    stat_cols = [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    _write_csv(root / "sweep_groups.csv", [*others, "n", *stat_cols],
               [[*(g["values"][k] for k in others), g["n"],
                 *(x for c in columns for x in (g["stats"].get(c, ("", ""))[:2]))]
                for g in groups])
  text = render(root, keys, rows, columns, groups)
  if (root / SELECTION_FILE).exists():
    text += "\n".join(render_selection(json.loads((root / SELECTION_FILE).read_text()))) + "\n"
  (root / "sweep.md").write_text(text)
  return text
