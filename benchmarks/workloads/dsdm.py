"""DSDM workloads: the generator train step and guided DDIM sampling (paper 004, Sec. IV-B).

``dsdm_step`` is the ``dsdm`` method's stage ``generator`` step
(``dsdm_parts.generator.GeneratorStage``, variant ``mask_reference``): the
``DiffusionUNet`` with SPADE on the one-hot mask (up path and, with
``spade_mid``, the middle), MCAA on the reference embedding (a Psi_FC of h*w
tokens per attention resolution) and the learned-range variance; hflip, both
conditions dropped together with ``p_uncond``, the hybrid loss L_simple +
lambda L_vlb (``diffusion.training_losses(loss_type="hybrid")``), Adam and the
EMA, built and jitted by the trainer on a synthetic batch {"image" (grey, in
[0, 1]), "mask" (int, 3 classes), "ref" (the reference embedding, given as an
input as the stage's cached embeddings are)}. The step never runs the
reference encoder, so the config carries ``data_info`` (what a finished run
records) instead of a data set. A/B rounds against
``benchmarks.torch_ref.diffusion_unet.DSDMTrainStep`` (the same UNet, built
from the flax module's settings with the JAX step's current weights; the same
hybrid loss, Adam and EMA; the JAX optimizer's 2% linear warm-up is a
schedule value, not work) when torch is installed.

``dsdm_ddim`` is one guided DDIM call of the sample and eval stages
(``diffusion.make_sampler`` with the kwargs of ``dsdm_parts.common.
sample_conditioned``: learned variance, x0 clipped to [-1, 1], eta 0,
guidance s = ``sample.guidance_scale`` with the zero null condition, the
conditional and the null batch in one model call per step, eq. 17), against
``torch_ref.diffusion_unet.guided_ddim_sample`` (a Python loop of the same
steps under ``torch.no_grad``) on the same weights and x_T. It also times one
guided model call (the 2B-batch UNet forward and the guidance combination)
in alternating rounds with the sampling call, and reports the sampler
overhead (call - n x forward) / (n x forward) (issue 18's goal: <= 3%). The
conditions are the same at every step, so XLA hoists the work that depends on
them alone out of the sampler's loop (SPADE's shared/gamma/beta convs on the
mask, Psi_FC; in the compiled small-size sampler 36 of the forward's 96 convs
stay in the loop body): a step then costs less than a standalone guided call
and the overhead can be negative. The torch loop recomputes them every step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops, harness, steps, torch_ab
from benchmarks.workloads.common import (Options, abstract_fn, abstract_record,
                                         measure_config, row, torch_compare,
                                         torch_skipped)
from medrep_jax import config_lib, diffusion
from medrep_jax.data.sources import SourceInfo
from medrep_jax.methods import load_method
from medrep_jax.methods.dsdm_parts import common

# size: configs/dsdm.py generator preset (image size, UNet, reference width, T); batch:
# images per step.
STEP = {
    "quick": dict(size="tiny", batch=4),
    "cpu": dict(size="small", batch=16),
    "gpu": dict(size="paper", batch=10),
}
# batch: images per sampling call (the model sees 2x that); steps: DDIM steps; rounds:
# alternating timing rounds (a CPU-size call takes minutes on one core, so 2 there), at
# most the suite's.
DDIM = {
    "quick": dict(size="tiny", batch=4, steps=10, rounds=2),
    "cpu": dict(size="small", batch=16, steps=50, rounds=2),
    "gpu": dict(size="paper", batch=16, steps=50, rounds=3),
}
NUM_MASK_CLASSES = 3  # background, benign, malignant (the paper's masks).
OVERHEAD_TARGET = 0.03


def generator_config(opts: Options, size: str, batch: int) -> Any:
  """The ``generator`` stage config of ``configs/dsdm.py`` preset ``size`` (variant
  mask_reference), grey images with 3 mask classes recorded as ``data_info``."""
  c = config_lib.config_module("dsdm", config_lib.CONFIG_DIR).generator_config(
      variant="mask_reference", size=size, data="phantoms")
  c.train.update(batch_size=batch, eval_batch_size=batch, num_epochs=0.0, num_steps=1000,
                 progress=False)
  c.data.channels = 1
  c.dtype = opts.compute_dtype
  c.data_info = dataclasses.asdict(SourceInfo(
      name="synthetic_image_mask", num_classes=0, class_names=(), channels=1,
      has_mask=True, num_mask_classes=NUM_MASK_CLASSES, image_dtype="float32"))
  return c


def synthetic_batch(config: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
  """{"image" (B, H, W, 1) in [0, 1], "mask" int32 (B, H, W), "ref" (B, ref_embed_dim)}."""
  size = int(config.data.image_size)
  rng = np.random.default_rng(seed)
  return {"image": rng.random((batch, size, size, 1), np.float32),
          "mask": rng.integers(0, NUM_MASK_CLASSES, (batch, size, size)).astype(np.int32),
          "ref": rng.standard_normal((batch, int(config.model.ref_embed_dim))
                                     ).astype(np.float32)}


def step_setup(opts: Options) -> tuple[Any, dict[str, np.ndarray]]:
  """(config, batch) of ``dsdm_step`` at the suite's size."""
  s = opts.size(STEP)
  c = generator_config(opts, s["size"], s["batch"])
  return c, synthetic_batch(c, s["batch"], opts.seed)


def cond_specs(batch: Mapping[str, Any], num_classes: int) -> tuple[Any, dict[str, Any]]:
  """(x, cond) ShapeDtypeStructs of one model call on ``batch``'s shapes."""
  b, h, w = batch["mask"].shape
  x = jax.ShapeDtypeStruct((b, h, w, batch["image"].shape[-1]), jnp.float32)
  return x, {"mask": jax.ShapeDtypeStruct((b, h, w, num_classes), jnp.float32),
             "ref": jax.ShapeDtypeStruct(batch["ref"].shape, jnp.float32)}


def step_analytic(method: Any, state: Any, batch: Mapping[str, jax.Array]
                  ) -> tuple[float, float]:
  """Conv + matmul FLOPs of eps_theta(x_t, t, mask, ref), the trained forward."""
  x, cond = cond_specs(batch, method.num_mask_classes)
  t = jax.ShapeDtypeStruct((x.shape[0],), jnp.int32)
  fwd = flops.count_flops(common.apply_fn(method.model), flops.abstract(state.params), x, t,
                          cond)
  return fwd, 0.0


def torch_unet(model: Any, params: Any, image_size: int) -> Any:
  """The torch reference of the flax generator ``model`` holding ``params``."""
  from benchmarks.torch_ref import diffusion_unet as ref  # pylint: disable=import-outside-toplevel
  net = ref.unet_from_flax(model, 1, image_size=image_size)
  ref.load_flax_params(net, jax.device_get(params))
  return net


def torch_tables(sched_name: str, num_timesteps: int, device: str = "cpu") -> Any:
  from benchmarks.torch_ref import diffusion_unet as ref  # pylint: disable=import-outside-toplevel
  if sched_name != "cosine":
    raise ValueError(f"the torch DSDM reference implements the cosine schedule, not "
                     f"{sched_name!r}")
  return ref.DiffusionTables(ref.cosine_betas(num_timesteps), device)


def _to_torch(batch: Mapping[str, np.ndarray], dev: str, fmt: Any) -> tuple[Any, Any, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  image = (torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2)
           .contiguous(memory_format=fmt).to(dev))
  return (image, torch.from_numpy(np.array(batch["mask"])).to(dev),
          torch.from_numpy(np.array(batch["ref"])).to(dev))


def step_factory(config: Any, method: Any, params_fn: Callable[[], Any], n_params: int,
                 batch: Mapping[str, np.ndarray]) -> torch_ab.TorchFactory:
  """Torch DSDM steps on the weights ``params_fn()`` returns (hybrid loss, Adam, EMA).

  Raises:
    RuntimeError: the torch UNet's parameter count is not ``n_params`` (the JAX one's).
  """

  def make(amp: bool, channels_last: bool, compile_: bool):
    import torch  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from benchmarks.torch_ref import diffusion_unet as ref
    dev = torch_ab.device()
    model = torch_unet(method.model, params_fn(), int(config.data.image_size))
    if ref.count_params(model) != n_params:
      raise RuntimeError(f"torch reference UNet has {ref.count_params(model)} parameters, "
                         f"the JAX generator {n_params}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev).to(memory_format=fmt)
    net = torch_ab.autocast_module(model) if amp else model
    d = config.diffusion
    step = ref.DSDMTrainStep(
        torch.compile(net) if compile_ else net,
        torch_tables(str(d.schedule), int(d.num_timesteps), dev),
        method.num_mask_classes, lr=float(config.optim.lr),
        ema_decay=float(config.ema_decay), p_uncond=float(config.p_uncond),
        lambda_vlb=float(config.loss.lambda_vlb), hflip=bool(config.augment.hflip))
    image, mask, refs = _to_torch(batch, dev, fmt)
    return lambda: step(image, mask, refs)

  return make


def run_step(opts: Options) -> list[dict[str, Any]]:
  s = opts.size(STEP)
  c, batch = step_setup(opts)

  compare = torch_compare(opts, lambda bench, record: step_factory(
      c, bench.method, lambda: bench.state.params, record["params"], batch),
                          count_params=True)

  rec = measure_config(c, batch, opts, analytic=step_analytic, compare=compare)
  px = int(c.data.image_size)
  return [row("dsdm_step", f"{s['size']} {px}px grey B{s['batch']} K{NUM_MASK_CLASSES} "
                           f"ref{c.model.ref_embed_dim} hybrid {c.dtype}", rec)]


# ------------------------------------------------------------------ guided DDIM


class GuidedSampling:
  """The DSDM generator of a preset with random weights, its guided DDIM sampler, the
  guided model call and the inputs of one sampling call.

  The weights are the initialization with every zero-initialized leaf (the output convs
  and attention projections, which make a fresh UNet output zeros) drawn at random, so
  the sampled images depend on every layer.
  """

  def __init__(self, opts: Options):
    s = opts.size(DDIM)
    self.size, self.batch, self.num_steps = s["size"], s["batch"], s["steps"]
    self.config = c = generator_config(opts, s["size"], s["batch"])
    self.method = load_method(c)
    self.model, self.sched = self.method.model, self.method.sched
    self.guidance_scale = float(c.sample.guidance_scale)
    size = int(c.data.image_size)
    self.shape = (self.batch, size, size, 1)
    host = synthetic_batch(c, self.batch, opts.seed)
    self.cond = common.make_cond(True, True, jnp.asarray(host["mask"]), NUM_MASK_CLASSES,
                                 jnp.asarray(host["ref"]))
    self.host = host
    k_init, k_x, self.rng = jax.random.split(jax.random.key(opts.seed), 3)
    self.x_T = jax.random.normal(k_x, self.shape, jnp.float32)
    t0 = jnp.zeros((self.batch,), jnp.int32)
    init = lambda k: self.model.init(k, self.x_T, t0, spatial_cond=self.cond["mask"],
                                     ref_embed=self.cond["ref"])["params"]
    if opts.abstract:  # Shapes only (Options.abstract): nothing is initialized.
      self.params = jax.eval_shape(init, k_init)
    else:
      self.params = jax.tree.map(jnp.asarray, _nonzero(jax.jit(init)(k_init), opts.seed))
    # The kwargs of common.sample_conditioned (sampler "ddim").
    self.sample = diffusion.make_sampler(
        common.apply_fn(self.model), self.sched, self.shape, sampler="ddim",
        num_steps=self.num_steps, eta=float(c.sample.eta), learned_variance=True,
        clip_x0=1.0, guidance_scale=self.guidance_scale, null_cond=0.0)
    apply = common.apply_fn(self.model)
    # One guided model call: the 2B batch [cond; null] and eq. 17, as each sampler step.
    self.guided = lambda p, x, t, cond: diffusion.guided_model_fn(
        lambda x, t, c: apply(p, x, t, c), self.guidance_scale, 0.0,
        learned_variance=True)(x, t, cond)
    self.forward = jax.jit(self.guided)
    self.t_mid = jnp.full((self.batch,), self.sched.num_timesteps // 2, jnp.int32)
    self.torch_threads: dict[str, Any] = {}
    self.torch_first_calls: dict[str, float] = {}

  def call(self) -> jax.Array:
    return self.sample(self.params, self.rng, self.cond, None, self.x_T)

  def call_forward(self) -> jax.Array:
    return self.forward(self.params, self.x_T, self.t_mid, self.cond)

  def torch_factory(self) -> torch_ab.TorchFactory:
    """Torch guided DDIM loops on the same weights, x_T and conditions (``one_call``:
    one guided model call instead, as a step of the loop makes it)."""

    def make(amp: bool, channels_last: bool, compile_: bool, one_call: bool = False):
      import torch  # pylint: disable=import-outside-toplevel
      # pylint: disable-next=import-outside-toplevel
      from benchmarks.torch_ref import diffusion_unet as ref
      dev = torch_ab.device()
      fmt = torch.channels_last if channels_last else torch.contiguous_format
      model = torch_unet(self.model, self.params, self.shape[1]).to(dev).to(
          memory_format=fmt).eval()
      net = torch_ab.autocast_module(model) if amp else model
      net = torch.compile(net) if compile_ else net
      d = self.config.diffusion
      tables = torch_tables(str(d.schedule), int(d.num_timesteps), dev)
      x_T = (torch.from_numpy(np.array(self.x_T)).permute(0, 3, 1, 2)
             .contiguous(memory_format=fmt).to(dev))
      segmap = (torch.from_numpy(np.array(self.cond["mask"])).permute(0, 3, 1, 2)
                .contiguous(memory_format=fmt).to(dev))
      refs = torch.from_numpy(np.array(self.cond["ref"])).to(dev)
      if one_call:
        t = torch.full((2 * self.batch,), int(self.t_mid[0]), device=dev)

        @torch.no_grad()
        def call():
          return net(torch.cat([x_T, x_T]), t, None, torch.cat([segmap, 0 * segmap]),
                     torch.cat([refs, 0 * refs]))

        return call
      return lambda: ref.guided_ddim_sample(net, tables, x_T, segmap, refs,
                                            num_steps=self.num_steps,
                                            guidance_scale=self.guidance_scale, clip_x0=1.0)

    return make


def _nonzero(params: Any, seed: int) -> Any:
  """``params`` with every all-zero leaf replaced by N(0, 0.02^2) draws (host arrays)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (0.02 * rng.standard_normal(p.shape)).astype(np.float32)
                      if not np.any(np.asarray(p)) else np.asarray(p), params)


def _torch_rounds(g: GuidedSampling, opts: Options, fields: dict[str, Any]
                  ) -> dict[str, tuple[dict[str, Any], Callable[[], Any]]]:
  """{setup name: (setup, loop)} for each torch setup, with torch's threads set from one
  guided model call (a loop is n of them). The eager loop is not called first (a CPU-size
  call is minutes); a compiled one is called twice. A failed compiled setup goes to
  ``fields`` (``torch``, ``torch_notes``) instead."""
  out: dict[str, tuple[dict[str, Any], Callable[[], Any]]] = {}
  factory = g.torch_factory()
  for s in torch_ab.setups(opts.compile_torch, gpu=opts.torch_gpu_setups):
    try:
      if s["compile"]:
        loop, g.torch_first_calls[s["name"]] = torch_ab.build(factory, s)
      else:
        loop = factory(s["amp"], s["channels_last"], s["compile"])
        threads, probe = torch_ab.set_threads(
            factory(s["amp"], s["channels_last"], s["compile"], one_call=True),
            opts.torch_threads)
        g.torch_threads = {"threads": threads, "probe": probe}
    except Exception as e:  # pylint: disable=broad-except  # Reported in the row.
      torch_ab.failed(s, e, fields)
      continue
    out[s["name"]] = (s, loop)
  return out


def run_ddim(opts: Options) -> list[dict[str, Any]]:
  """Guided DDIM: the call (images/s, vs torch), the guided model call, the overhead.

  One set of alternating rounds times the JAX call, each torch loop and ``fwd_iters``
  guided model calls (ABBA order), so the torch ratio and the overhead come from the
  same rounds (a CPU-size call is minutes: no separate probe or warm-up call; the
  ahead-of-time compile serves the first call).
  """
  g = GuidedSampling(opts)
  b, n = g.batch, g.num_steps
  x, cond = cond_specs({"image": np.zeros(g.shape), "mask": np.zeros(g.shape[:3]),
                        "ref": g.host["ref"]}, NUM_MASK_CLASSES)
  fwd_flops = flops.count_flops(g.guided, flops.abstract(g.params), x,
                                jax.ShapeDtypeStruct((b,), jnp.int32), cond)
  dtype = str(g.config.dtype)
  name = f"DDIM-{n} s={g.guidance_scale:g} {g.size} {g.shape[1]}px B{b}"
  point = f"{name} (model batch {2 * b}) {dtype} [s/call, images/s]"
  if opts.abstract:
    rec, lowered = abstract_fn(opts, g.sample, g.params, g.rng, g.cond, None, g.x_T)
    return [row("dsdm_ddim", point, abstract_record(rec, n * fwd_flops, b, dtype, opts,
                                                    lowered), ddim_steps=n)]
  comp = harness.compile_time(g.sample, g.params, g.rng, g.cond, None, g.x_T)
  fwd_comp = harness.compile_time(g.forward, g.params, g.x_T, g.t_mid, g.cond)
  xla = harness.cost_flops(comp.compiled)
  mem, peak = steps.memory_peak(comp.compiled)
  fwd_probe = steps.timed(g.call_forward, warmup=1, iters=1)["median_s"]
  fwd_iters = max(1, min(n, opts.iters(fwd_probe)))
  rounds = min(opts.size(DDIM)["rounds"], opts.timing["rounds"])
  fns: dict[str, Callable[[], Any]] = {"ddim": g.call, "forward": g.call_forward}
  skip = torch_skipped(opts)
  fields: dict[str, Any] = {"torch_notes": [skip]} if skip else {
      "torch": {}, "torch_notes": list(opts.torch_notes)}
  loops = {} if skip else _torch_rounds(g, opts, fields)
  fns.update({f"torch_{k}": loop for k, (_, loop) in loops.items()})
  with jax.transfer_guard("disallow"):
    med = harness.interleave(fns, rounds, iters={k: fwd_iters if k == "forward" else 1
                                                 for k in fns}, warmup=0)
  timing, fwd = harness.summarize(med["ddim"]), harness.summarize(med["forward"])
  overhead = harness.ratio_stats([(d - n * f) / (n * f)
                                  for d, f in zip(med["ddim"], med["forward"])])
  # Load only adds time, so the fastest rounds are the least disturbed estimate.
  overhead["from_min_times"] = (min(med["ddim"]) - n * min(med["forward"])) / (
      n * min(med["forward"]))
  measured = []
  for k, (s, _) in loops.items():
    t = med[f"torch_{k}"]
    fields["torch"][k] = torch_ab.setup_record(
        s, harness.summarize(t), b, g.torch_first_calls.get(k),
        g.torch_threads.get("threads"), g.torch_threads.get("probe"))
    measured.append((s, harness.ratio_stats([tt / j for tt, j in zip(t, med["ddim"])])))
  if not skip:
    fields.update(torch_ab.ratio_fields(measured, fields["torch"]))
  rec: dict[str, Any] = dict(fields)
  rec.update({"lower_s": comp.lower_s, "compile_s": comp.compile_s, "memory": mem,
              "memory_peak_bytes": peak, "ddim_steps": n, "dtype": dtype,
              "guidance_scale": g.guidance_scale, "batch": b, "model_batch": 2 * b,
              "flops_per_example_xla": None if xla is None else xla / b,
              "times": timing["times"], "rounds": rounds,
              "jit_cache_size": steps.jit_cache_size(g.sample),
              "device_peak_bytes": steps.device_peak_bytes(),
              "overhead": overhead, "overhead_target": OVERHEAD_TARGET,
              "overhead_within_target": overhead["median"] <= OVERHEAD_TARGET,
              "forward_s": fwd["median_s"]})
  steps.throughput(rec, timing, b, n * fwd_flops, opts.peak)
  fwd_rec = {"lower_s": fwd_comp.lower_s, "compile_s": fwd_comp.compile_s,
             "flops_per_example_xla": _per(harness.cost_flops(fwd_comp.compiled), b),
             "times": fwd["times"], "iters_per_round": fwd_iters, "dtype": dtype}
  steps.throughput(fwd_rec, fwd, b, fwd_flops, opts.peak)
  return [
      row("dsdm_ddim", point, rec),
      row("dsdm_ddim", f"  one guided model call ({2 * b} = cond + null) [s/call, "
                       f"images/s]", fwd_rec),
      row("dsdm_ddim", f"  sampler overhead (call - {n} x fwd)/({n} x fwd) = "
                       f"{overhead['median']:+.2%} ({overhead['min']:+.2%}.."
                       f"{overhead['max']:+.2%}; target <= {OVERHEAD_TARGET:.0%}) [s/call]",
          {"step_s": timing["median_s"] - n * fwd["median_s"], "overhead": overhead,
           "overhead_target": OVERHEAD_TARGET}),
  ]


def _per(total: float | None, n: int) -> float | None:
  return None if total is None else total / n
