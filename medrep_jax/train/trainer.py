"""The one trainer: every method runs through `train_and_evaluate`.

One jitted train step with donated state and `NamedSharding`; per-step RNG by `fold_in`;
metrics stay on device until a logging step; eval at a period; orbax checkpoints with the
data-iterator state; SIGTERM saves and exits; a NaN/Inf metric, or a NaN/Inf in the state
about to be saved, stops the run and keeps the last good checkpoint (DESIGN.md,
principles 3, 5 and 6).

The workdir is held by a lock for the run (`core.workdir`). Its config.json is written
only after the config has been checked against the existing one (a finished run refuses
another config; a resumed run refuses one unless `allow_config_change`) and after the
data and the state have been built, so a run that fails its checks leaves the workdir as
it was.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from medrep_jax import config_lib
from medrep_jax import errors
from medrep_jax.core import checkpoint as ckpt_lib
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.core import optim
from medrep_jax.core import runs
from medrep_jax.core import workdir as workdir_lib
from medrep_jax.data import loader
from medrep_jax.methods import base, load_method
from medrep_jax.train import report as report_lib
from medrep_jax.train.logging import MetricWriter

log = logging.getLogger(__name__)


NonFiniteError = errors.NonFiniteError  # a metric or the state to save is NaN/Inf


def _say(message: str) -> None:
  """A line on the console from process 0, above the progress bar."""
  if jax.process_index() == 0:
    tqdm.write(message, file=sys.stdout)


class Preempted(SystemExit):
  """Raised after a SIGTERM-triggered save; exit code 143 like a plain SIGTERM."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


@contextlib.contextmanager
def _sigterm_flag():
  """Sets `flag.is_set()` on SIGTERM instead of dying mid-step."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.getsignal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, lambda *_: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def write_config(config, workdir: pathlib.Path, changes: dict | None = None,
                 step: int | None = None) -> None:
  """Writes WORKDIR/config.json (atomically) and records `changes` in
  config_history.jsonl; only process 0 writes. Call it after `workdir.check_config`."""
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if changes:
    workdir_lib.record_changes(workdir, changes, step)
  workdir_lib.write_json(workdir / "config.json", config_lib.to_dict(config))


def record_data_info(config, info, train_source=None) -> None:
  """Records what the data gave in the config, so config.json holds the values the run
  really used and the model can be rebuilt without the data (`Stage.info`).

  `config.data_info` gets the whole `SourceInfo`, the number of training examples and the
  stored shape of the first training image; data fields left to the data (0 or ()) get
  its values. Keys filled this way are ignored by the finished-run check
  (`workdir.derived_keys`), since a new config still holds the "infer" value.
  """
  recorded = dataclasses.asdict(info)
  if train_source is not None:
    recorded["train_examples"] = len(train_source)
    first = train_source[0] if len(train_source) else {}
    if "image" in first:
      recorded["image_shape"] = list(np.shape(first["image"]))
  with config.unlocked():
    config.data_info = recorded
  for key in workdir_lib.DATA_DERIVED:
    if key in config.data and not config.data[key]:
      config.data[key] = getattr(info, key)


def note_changes(workdir: pathlib.Path, changes: dict, resume_step: int | None) -> None:
  """Prints the config changes a run proceeds with (allowed, or nothing to resume)."""
  if not changes or jax.process_index() != 0:
    return
  how = (f"resuming from step {resume_step} with --allow_config_change"
         if resume_step is not None else "the last attempt left no checkpoint; starting "
         "afresh")
  print(f"The config differs from {pathlib.Path(workdir) / 'config.json'} ({how}; recorded "
        f"in {workdir_lib.HISTORY_NAME}):\n{workdir_lib.format_changes(changes)}")


def _all_agree(ok: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.array(ok, np.int32))))


def hold_workdir(workdir: str | pathlib.Path):
  """The run lock of `workdir` (written by process 0; every process fails together)."""
  return workdir_lib.lock(workdir, enabled=jax.process_index() == 0,
                          sync=_all_agree if jax.process_count() > 1 else None)


def _average(records: list[dict[str, np.ndarray]]) -> dict[str, float]:
  keys = records[0].keys()
  return {k: float(np.mean([np.asarray(r[k], np.float64) for r in records])) for k in keys}


def _agreed_stop(preempt: threading.Event, sync_point: bool) -> bool:
  """Whether to save and stop after this step, the same answer on every process.

  One process stops as soon as it gets SIGTERM. With several processes the flags are
  all-gathered at sync points only (log, checkpoint and last steps, which every process
  reaches at the same step), so all of them save the same step together; a process that
  stopped alone would leave the others blocked in the checkpoint's collectives.
  """
  if jax.process_count() == 1:
    return preempt.is_set()
  if not sync_point:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array(preempt.is_set(), np.int32))
  return bool(np.max(flags))


def _check_finite(records: list[tuple[int, dict]], last_good: int | None,
                  ckpt_dir: pathlib.Path) -> None:
  for step, metrics in records:
    for name in sorted(metrics, key=lambda k: k != "loss"):  # name the loss first
      value = metrics[name]
      if not np.all(np.isfinite(np.asarray(value))):
        kept = (f"the last good checkpoint (step {last_good}) in {ckpt_dir} is kept"
                if last_good is not None else "no checkpoint had been written yet")
        raise NonFiniteError(
            f"metric {name!r} is {np.asarray(value).tolist()} at step {step}; training "
            f"stopped and {kept}. Lower optim.lr, set optim.grad_clip, or check the data.")


class Trainer:
  """Runs one method in one workdir. Use `train_and_evaluate` unless you need the parts."""

  def __init__(self, config, workdir: str | pathlib.Path, method: base.Method | None = None,
               devices=None, *, allow_config_change: bool = False):
    self.config = config
    self.workdir = pathlib.Path(workdir).absolute()  # made by `run` (with its lock)
    self.allow_config_change = allow_config_change
    self.mesh = mesh_lib.make_mesh(config.mesh, devices)
    self.method = method if method is not None else load_method(config)
    self.method.workdir, self.method.mesh = self.workdir, self.mesh
    tc = config.train
    mesh_lib.check_batch_size(int(tc.batch_size), self.mesh)
    mesh_lib.check_batch_size(int(tc.eval_batch_size), self.mesh, "train.eval_batch_size")
    self.checkpointer = ckpt_lib.Checkpointer(self.workdir / "checkpoints",
                                              every=int(tc.checkpoint_every),
                                              keep=int(tc.keep_checkpoints))
    self.writer = MetricWriter(self.workdir)
    self.base_rng = jax.random.key(int(config.seed))
    self._eval_source = None

  # ------------------------------------------------------------------------------ state
  def build_state(self, sample_batch: dict[str, jax.Array]):
    init_rng = jax.random.fold_in(self.base_rng, -1 & 0x7FFFFFFF)
    abstract = jax.eval_shape(self.method.init_state, init_rng, sample_batch)
    self.state_sharding = self.method.state_shardings(abstract, self.mesh)
    state = jax.jit(self.method.init_state, out_shardings=self.state_sharding)(
        init_rng, sample_batch)
    return state

  def warm_start(self, state):
    """Applies `config.init_from` (only when not resuming)."""
    src = self.config.init_from
    if not src:
      return state
    saved = runs.load_run(src).state
    # Rules apply inside each collection: "encoder:encoder" maps params/encoder/... and
    # model_state/batch_stats/encoder/... alike.
    merged = {"params": None, "model_state": {}}
    loaded, fresh = [], []
    groups = [("params", state.params, saved.get("params", {}))]
    groups += [(f"model_state/{col}", tree, saved.get("model_state", {}).get(col, {}))
               for col, tree in state.model_state.items()]
    for prefix, target, source in groups:
      tree, ok, new = ckpt_lib.merge_by_path(jax.device_get(target), source,
                                             self.config.init_from_rules)
      loaded += [f"{prefix}/{p}" for p in ok]
      fresh += [f"{prefix}/{p}" for p in new]
      if prefix == "params":
        merged["params"] = tree
      else:
        merged["model_state"][prefix.split("/", 1)[1]] = tree
    if not loaded:
      raise config_lib.ConfigError(
          f"init_from={src}: no parameter matched by path and shape; set init_from_rules, "
          f"e.g. 'encoder:encoder'")
    lines = [f"init_from: {src}", f"loaded {len(loaded)} arrays, left {len(fresh)} new", "",
             "# loaded"] + loaded + ["", "# new"] + fresh
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "init_from.txt").write_text("\n".join(lines) + "\n")
    print(f"init_from: loaded {len(loaded)} arrays from {src}, {len(fresh)} left new "
          f"(see {self.workdir / 'init_from.txt'})")
    sh = self.state_sharding
    params = jax.device_put(merged["params"], sh.params)
    model_state = jax.device_put(merged["model_state"], sh.model_state)
    # Re-initialize the optimizer state for the new parameters.
    opt_state = jax.jit(state.tx.init, out_shardings=sh.opt_state)(params)
    return state.replace(params=params, model_state=model_state, opt_state=opt_state)

  # ------------------------------------------------------------------------------- eval
  def evaluate(self, state, *, final: bool) -> dict[str, float]:
    tc = self.config.train
    step = int(state.step)
    ctx = base.EvalContext(workdir=self.workdir, step=step, final=final, split=tc.eval_split)
    _say(f"{'final ' if final else ''}evaluation at step {step} on the {tc.eval_split} "
         f"split ...")
    result = self.method.evaluate_state(state, ctx)
    if result is None:
      result = self.method.evaluate(self._eval_outputs(state), state, ctx)
    scalars = {k: v for k, v in result.metrics.items()
               if np.ndim(v) == 0 and not isinstance(v, str)}
    self.writer.write(step, "eval", {f"eval/{k}": v for k, v in scalars.items()})
    _say(f"eval at step {step}: " + ", ".join(
        f"{k}={report_lib.fmt(float(v))}" for k, v in list(scalars.items())[:10]))
    self.figures.update(result.figures)
    self.writer.write_figures(step, result.figures)
    self.report_lines = list(result.lines)
    return result.metrics

  def _eval_outputs(self, state) -> dict[str, np.ndarray]:
    """`eval_step` over the eval split, gathered on the host (padding dropped)."""
    tc = self.config.train
    if self._eval_source is None:
      self._eval_source = self.method.make_source(tc.eval_split)
    eval_fn = getattr(self, "_eval_fn", None)
    if eval_fn is None:
      def eval_fn(s, b):
        return {**self.method.eval_step(s, b), "_valid": b["_valid"]}
      eval_fn = self._eval_fn = jax.jit(eval_fn)
    outs = []
    batches = loader.eval_batches(self._eval_source, self.method.transforms(tc.eval_split),
                                  global_batch=int(tc.eval_batch_size),
                                  max_examples=int(tc.max_eval_examples),
                                  num_threads=int(tc.num_threads))
    for host_batch in batches:
      outs.append(eval_fn(state, mesh_lib.to_global(host_batch, self.mesh)))
    host = mesh_lib.to_host(outs)
    cat = {k: np.concatenate([o[k] for o in host]) for k in host[0]}
    valid = cat.pop("_valid") > 0
    return {k: v[valid] for k, v in cat.items()}

  # ------------------------------------------------------------------------------- loop
  def run(self) -> dict[str, Any]:
    """Trains (or resumes) under the workdir's lock; a finished run returns done.json."""
    with hold_workdir(self.workdir):
      return self._run()

  def _run(self) -> dict[str, Any]:
    config, tc = self.config, self.config.train
    self.figures: dict[str, str] = {}
    self.report_lines: list[str] = []
    latest = self.checkpointer.latest_step()
    done = self.workdir / "done.json"
    if done.exists():
      workdir_lib.check_config(self.workdir, config, finished=True, resume_step=latest,
                               allow=False, ignore=workdir_lib.derived_keys(config))
      print(f"Run in {self.workdir} already finished at step {latest}; nothing to do.")
      return json.loads(done.read_text())
    # The stage's pre-flight (batch vs data, image size vs network) as a pipeline runs it
    # for its unfinished stages: a single run's config errors read the same, and a stage
    # whose inputs were pending then is checked now that they exist.
    self.method.preflight({})
    train_source = self.method.make_source("train")
    record_data_info(config, self.method.info, train_source)
    if float(tc.get("num_epochs", 0.0)) > 0:
      tc.num_steps = math.ceil(float(tc.num_epochs) * len(train_source) / int(tc.batch_size))
    num_steps = int(tc.num_steps)
    changes = workdir_lib.check_config(self.workdir, config, finished=False,
                                       resume_step=latest, allow=self.allow_config_change)
    train_ds = loader.train_dataset(train_source, self.method.transforms("train"),
                                    global_batch=int(tc.batch_size), seed=int(config.seed))
    with jax.set_mesh(self.mesh):
      sample = mesh_lib.to_global(train_ds[0], self.mesh)
      state = self.build_state(sample)
      iter_state = None
      if latest is not None:
        state, iter_state = self.checkpointer.restore(state, latest)
      else:
        state = self.warm_start(state)
      # Config, data and state are checked: only now does the run write.
      note_changes(self.workdir, changes, latest)
      write_config(config, self.workdir, changes, latest)
      self.writer.truncate_after(latest or 0)  # drop records no checkpoint backs
      if latest is not None:
        print(f"Resumed from {self.checkpointer.directory} at step {latest}")
      step_fn = self._compile_step()
      finished = False
      try:
        result = self._loop(state, step_fn, train_ds, iter_state, num_steps)
        finished = True
        return result
      finally:  # finish in-flight async saves, also when the loop raised
        if getattr(self, "_bar", None) is not None:
          self._bar.close()  # before an error message, not after it
        try:
          self.checkpointer.close()
        except Exception:  # pylint: disable=broad-except
          if finished:
            raise
          log.exception("closing the checkpointer after an error")  # keep the first error
        self.writer.close()

  def _compile_step(self):
    method, base_rng = self.method, self.base_rng

    def step(state, batch):
      return method.train_step(state, batch, jax.random.fold_in(base_rng, state.step))

    return jax.jit(step, in_shardings=(self.state_sharding, mesh_lib.batch_sharding(self.mesh)),
                   out_shardings=(self.state_sharding, mesh_lib.replicated(self.mesh)),
                   donate_argnums=0)

  def _loop(self, state, step_fn, train_ds, iter_state, num_steps: int):
    tc = self.config.train
    log_every, eval_every = int(tc.log_every), int(tc.eval_every)
    ckpt_every = int(tc.checkpoint_every)
    it = loader.iterate(train_ds, num_threads=int(tc.num_threads),
                        prefetch=int(tc.prefetch), state=iter_state)
    start = int(state.step)
    last_good = self.checkpointer.latest_step()
    pending: list[tuple[int, Any]] = []
    running: collections.deque = collections.deque()  # dispatched, not yet seen complete
    # The learning rate of the update that ended at each logged step (a TensorBoard scalar).
    k = optim.accumulate_steps(self.config.optim)
    schedule = optim.make_schedule(self.config.optim, math.ceil(num_steps / k))
    bar = self._bar = tqdm(total=num_steps, initial=start, desc=self.config.method,
                           dynamic_ncols=True, mininterval=1.0, file=sys.stdout,
                           disable=not tc.progress or jax.process_index() != 0)
    t_last, n_last, first_step_time = time.perf_counter(), start, None
    final_metrics: dict[str, Any] = {}
    with _sigterm_flag() as preempt:
      for step in range(start, num_steps):
        batch = mesh_lib.to_global(next(it), self.mesh)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if first_step_time is None:
          jax.block_until_ready(metrics)
          first_step_time = time.perf_counter() - t0
          t_last, n_last = time.perf_counter(), step + 1
        cur = step + 1
        pending.append((cur, metrics))
        # The bar counts completed steps: a step is done when its first metric is ready
        # (`is_ready` does not block, so the loop still runs ahead of the device).
        running.append(jax.tree.leaves(metrics)[0])
        while running and running[0].is_ready():
          running.popleft()
          bar.update(1)
        is_ckpt = ckpt_every > 0 and cur % ckpt_every == 0
        sync_point = cur % log_every == 0 or cur == num_steps or is_ckpt
        stop = _agreed_stop(preempt, sync_point)
        if sync_point or stop:
          host = [(s, jax.device_get(m)) for s, m in pending]
          bar.update(len(running))
          running.clear()
          _check_finite(host, last_good, self.checkpointer.directory)
          now = time.perf_counter()
          steps_done = cur - n_last
          avg = _average([m for _, m in host])
          avg["lr"] = float(schedule((cur - 1) // k))
          if steps_done > 0:
            avg["throughput/examples_per_sec"] = steps_done * int(tc.batch_size) / (now - t_last)
            avg["throughput/step_time_ms"] = 1e3 * (now - t_last) / steps_done
          if first_step_time is not None and "time/compile_and_first_step_sec" not in final_metrics:
            avg["time/compile_and_first_step_sec"] = first_step_time
            final_metrics["time/compile_and_first_step_sec"] = first_step_time
          self.writer.write(cur, "train", avg)
          bar.set_postfix({k: f"{v:.4g}" for k, v in avg.items() if k in ("loss",)})
          t_last, n_last, pending = now, cur, []
          final_metrics.update({k: v for k, v in avg.items() if not k.startswith("time/")})
        if eval_every > 0 and cur % eval_every == 0 and cur < num_steps:
          self.evaluate(state, final=False)
        if is_ckpt or stop:
          if self.checkpointer.save(cur, state, it.get_state(), force=True):
            last_good = cur
        if stop:
          self.checkpointer.close()
          self.writer.close()
          bar.close()
          print(f"SIGTERM: saved a checkpoint at step {cur} in {self.checkpointer.directory}; "
                f"re-run the same command to resume.")
          raise Preempted(cur)
    bar.close()
    eval_metrics = self.evaluate(state, final=True)
    self.checkpointer.save(int(state.step), state, it.get_state(), force=True)
    self.checkpointer.close()
    final = {"step": int(state.step), **{f"train/{k}": v for k, v in final_metrics.items()},
             **{f"eval/{k}": v for k, v in eval_metrics.items()}}
    self.writer.close()
    finish(self.workdir, self.config, final, base.Result(final, self.figures, self.report_lines))
    return final


def finish(workdir: pathlib.Path, config, final: dict[str, Any], result: base.Result) -> None:
  """Writes report.md (final metrics, figures, lines) and done.json for any stage."""
  if jax.process_index() == 0:
    report_lib.write_report(workdir, config, final, result.figures, result.lines)
    workdir_lib.write_json(workdir / "done.json", json.loads(json.dumps(final, default=float)))


def run_task(task: base.Task, config, workdir: pathlib.Path,
             changes: dict | None = None) -> dict[str, Any]:
  """Runs a stage with no train loop under the same contract as a trained run; its
  config.json is written once the task has succeeded."""
  task.workdir, task.mesh = workdir, mesh_lib.make_mesh(config.mesh)
  result = task.run()
  write_config(config, workdir, changes)
  writer = MetricWriter(workdir)  # the same contract as trained runs: metrics.jsonl + tb/
  writer.truncate_after(-1)  # a task is redone whole: drop an earlier attempt's record
  writer.write(0, "eval", {f"eval/{k}": v for k, v in result.metrics.items()
                           if isinstance(v, (int, float))})
  writer.write_figures(0, result.figures)
  writer.close()
  finish(workdir, config, result.metrics, result)
  return result.metrics


def train_and_evaluate(config, workdir: str | pathlib.Path, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Runs the stage `config` describes in `workdir`.

  A trained stage resumes from its checkpoints; a finished stage returns its done.json at
  once. The workdir is locked for the run.

  Args:
    config: the stage's config.
    workdir: the run directory (created when the run writes).
    allow_config_change: resume even though the config differs from the workdir's
      config.json; the change is recorded in config_history.jsonl.

  Raises:
    ConfigChanged: the config differs from that of a finished run, or of a resumable run
      without `allow_config_change`.
    WorkdirLocked: another run holds the workdir.
  """
  workdir = pathlib.Path(workdir).absolute()
  stage = load_method(config)
  if not isinstance(stage, base.Task):
    return Trainer(config, workdir, stage, allow_config_change=allow_config_change).run()
  with hold_workdir(workdir):
    done = workdir / "done.json"
    changes = workdir_lib.check_config(workdir, config, finished=done.exists(),
                                       resume_step=None, allow=allow_config_change)
    if done.exists():
      print(f"Stage in {workdir} already finished; nothing to do.")
      return json.loads(done.read_text())
    note_changes(workdir, changes, None)
    return run_task(stage, config, workdir, changes)
