"""LTDiff++ stages `latent_ddpm`, `joint`, `translate`, `direct` and `evaluate`: the SDEdit
start, t* checks, conditioning by concatenation, the sharded step, the pixel-space DDPM,
the joint step's frozen encoder, and the tiny pipeline ae -> latent_ddpm -> translate ->
direct -> evaluate on phantoms (tiny sizes: 32 px, UNet++ widths (4, 8, 16), 8x8x4 latents)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medrep_jax import config_lib, diffusion, methods
from medrep_jax.core import mesh as mesh_lib
from medrep_jax.data.sources import DataError
from medrep_jax.methods.ltdiff_parts import joint, latent_ddpm, translate

from conftest import assert_same_step, config_module, one_step

ltdiff_cfg = config_module("ltdiff")


@pytest.fixture(scope="module")
def pipeline_dir(tiny_run):
  return tiny_run("pipeline_ltdiff")


# ------------------------------------------------------------------------------ pieces
def test_sdedit_start_is_q_sample_of_z_a_at_t_star():
  sched = diffusion.make_schedule("linear", 50)
  z_a = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
  key = jax.random.key(7)
  x_t, index = translate.sdedit_start(sched, z_a, 20, key)
  assert index == 19  # t* counts steps: schedule index t* - 1
  want = diffusion.q_sample(sched, z_a, jnp.full((3,), 19), jax.random.normal(key, z_a.shape))
  np.testing.assert_allclose(x_t, want, rtol=1e-6)
  # t* = 1: barely noised
  x1, _ = translate.sdedit_start(sched, z_a, 1, key)
  assert float(jnp.abs(x1 - z_a).mean()) < 0.1


def test_translator_starts_from_the_sdedit_state():
  """With an ε-model that returns 0, one DDIM step from x_T gives x0 = x_T / sqrt(ᾱ): the
  sampler really started from q_sample(Z_A, t*)."""
  sched = diffusion.make_schedule("linear", 50)
  z_a = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  rng = jax.random.key(3)
  fn = translate.make_translator(lambda p, x, t, c: jnp.zeros_like(x), sched, 30,
                                 sampler="ddim", steps=1)
  out = fn({}, z_a, rng)
  x_t, index = translate.sdedit_start(sched, z_a, 30, jax.random.split(rng)[0])
  np.testing.assert_allclose(out, x_t / sched.sqrt_alphas_cumprod[index], rtol=1e-5)


@pytest.mark.parametrize("t_star", [0, 51, -3, 2.5])
def test_t_star_outside_1_to_T_is_a_clear_error(t_star):
  sched = diffusion.make_schedule("linear", 50)
  with pytest.raises(config_lib.ConfigError, match=r"translate.t_star.*\[1, 50\]"):
    translate.sdedit_start(sched, jnp.zeros((1, 8, 8, 4)), t_star, jax.random.key(0))
  with pytest.raises(config_lib.ConfigError, match="translate.t_star"):
    translate.make_translator(lambda p, x, t, c: x, sched, t_star)


def test_conditioning_is_channel_concatenation():
  config = ltdiff_cfg.latent_ddpm_config(size="tiny", data="phantoms")
  model = latent_ddpm.build_denoiser(config, 4)
  assert (model.out_channels, model.concat_channels) == (4, 4)
  z = jnp.zeros((2, 8, 8, 4))
  params = model.init(jax.random.key(0), z, jnp.zeros((2,), jnp.int32), concat=z)["params"]
  assert params["input_conv"]["kernel"].shape[-2] == 4 + 4  # latent + condition channels
  out = model.apply({"params": params}, z, jnp.zeros((2,), jnp.int32), concat=z + 1.0)
  assert out.shape == z.shape


def test_configs_and_bad_fields():
  for size in ("paper", "small", "tiny"):
    c = ltdiff_cfg.get_config(f"stage=latent_ddpm,size={size}")
    assert (c.stage, c.diffusion.parameterization) == ("latent_ddpm", "eps")
    assert c.optim.lr == (1e-3 if size == "tiny" else 1e-4)  # Sec. III-C: Adam, 1e-4
    t = ltdiff_cfg.get_config(f"stage=translate,size={size}")
    assert 1 <= t.translate.t_star <= ltdiff_cfg.get_config(
        f"stage=latent_ddpm,size={size}").diffusion.num_timesteps
  pipe = config_module("pipeline_ltdiff").get_config("size=tiny,data=phantoms")
  assert pipe.stages == ("ae", "latent_ddpm", "translate", "direct", "evaluate")
  assert (pipe.evaluate.compare.ltdiff, pipe.evaluate.compare.unetpp_direct,
          pipe.evaluate.compare.pixel_ddpm) == ("stage:translate", "stage:direct", "")
  pix = config_module("pipeline_ltdiff").get_config("size=tiny,pixel=True")
  assert pix.stages[-3:] == ("pixel_ddpm", "translate_pixel", "evaluate")
  assert (pix.pixel_ddpm.space, pix.translate_pixel.ddpm_from,
          pix.evaluate.compare.pixel_ddpm) == ("pixel", "stage:pixel_ddpm",
                                               "stage:translate_pixel")
  with pytest.raises(config_lib.ConfigError, match="space='pixel' is a variant of stage=lat"):
    ltdiff_cfg.get_config("stage=ae,space=pixel")
  assert (pipe.latent_ddpm.ae_from, pipe.translate.ddpm_from) == ("stage:ae",
                                                                  "stage:latent_ddpm")
  c = ltdiff_cfg.latent_ddpm_config(size="tiny", data="phantoms")
  c.diffusion.parameterization = "v"
  with pytest.raises(config_lib.ConfigError, match="diffusion.parameterization"):
    methods.load_method(c)
  c = ltdiff_cfg.latent_ddpm_config(size="tiny", data="phantoms")
  with pytest.raises(config_lib.ConfigError, match="ae_from is empty"):
    methods.load_method(c).model  # pylint: disable=expression-not-assigned


def test_pixel_ddpm_models_the_images_without_an_autoencoder():
  c = ltdiff_cfg.latent_ddpm_config(size="tiny", data="phantoms", space="pixel")
  stage = methods.load_method(c)
  assert isinstance(stage.ae, latent_ddpm.PixelSpace)  # ae_from is not read
  assert stage.info.channels == 1 and stage.model.concat_channels == 1
  x = jnp.linspace(-0.5, 1.5, 32 * 32).reshape(1, 32, 32, 1)
  z, skips = stage.ae.encode(stage.ae.variables, x)
  np.testing.assert_array_equal(z, x)
  assert skips == () and float(stage.ae.decode({}, z, skips).max()) == 1.0
  other = ltdiff_cfg.latent_ddpm_config(size="tiny", data="phantoms")
  other.data.image_size = 64
  with pytest.raises(config_lib.ConfigError, match=r"\(64, \(0.0, 2000.0\)\) differs"):
    stage.ae.check_data(other.data)
  c.space = "voxel"
  with pytest.raises(config_lib.ConfigError, match="space='voxel'"):
    methods.load_method(c)


# ------------------------------------------------------------------------------ runs
def _ddpm_config(ae_dir):
  c = ltdiff_cfg.latent_ddpm_config(size="tiny", data="phantoms")
  c.data.num_examples = 32
  c.train.progress = False
  c.ae_from = str(ae_dir)
  return c


@pytest.mark.xdist_group("pipeline_ltdiff")  # shares test_cli's tiny_run
def test_sharded_step_equals_single_device(pipeline_dir, tmp_path):
  assert jax.device_count() == 8
  config = _ddpm_config(pipeline_dir / "ae")
  config.optim.name = "sgd"
  assert_same_step(one_step(config, jax.devices()[:1], tmp_path / "one"),
                   one_step(config, jax.devices(), tmp_path / "eight"))
  cached = np.load(tmp_path / "one" / "latents_train.npz")
  assert cached["z_a"].shape[1:] == (8, 8, 4) == cached["z_b"].shape[1:]


@pytest.mark.xdist_group("pipeline_ltdiff")  # shares test_cli's tiny_run
def test_pipeline_runs_end_to_end(pipeline_dir):
  ddpm_dir, tr_dir = pipeline_dir / "latent_ddpm", pipeline_dir / "translate"
  for stage in ("ae", "latent_ddpm", "translate", "direct", "evaluate"):
    assert (pipeline_dir / stage / "done.json").exists(), stage
  rows = [json.loads(line) for line in (ddpm_dir / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if r["split"] == "eval"][-1]
  for key in ("eval/eps_mse", "eval/eps_mse_raw", "eval/za_zb_mse"):
    assert np.isfinite(final[key]), key
  assert (ddpm_dir / "latents_train.npz").exists() and (ddpm_dir / "latents_val.npz").exists()
  trained = methods.load_trained(ddpm_dir, method="ltdiff", stage="latent_ddpm")
  assert trained.model.concat_channels == trained.model.out_channels == 4
  assert {"ema", "scale_factor", "latent_shift"} <= set(trained.run.extras)

  root = tr_dir / "translated"
  names = {k: sorted(p.name for p in (root / k).glob("*.npy"))
           for k in ("A", "A_prime", "B")}
  assert names["A"] and names["A"] == names["A_prime"] == names["B"]
  assert len(names["A"]) == 8  # translate.max_slices at size=tiny
  a_prime = np.load(root / "A_prime" / names["A"][0])
  assert a_prime.shape == (32, 32) and a_prime.dtype == np.float32
  assert -1000.0 <= a_prime.min() and a_prime.max() <= 1000.0  # HU in the window
  assert (tr_dir / "figures" / "translate.png").stat().st_size > 1000
  report = (tr_dir / "report.md").read_text()
  assert "figures/translate.png" in report and "A' vs B" in report
  assert "medrep_jax.radiomics" in report and "texture of A can leak" in report
  metrics = [json.loads(line) for line in (tr_dir / "metrics.jsonl").read_text().splitlines()]
  last = metrics[-1]
  for key in ("l1_a_b", "l1_aprime_b", "psnr_a_b", "psnr_aprime_b", "mae_hu_aprime_b"):
    assert any(np.isfinite(v) for k, v in last.items() if k.endswith(key)), (key, last)


@pytest.mark.xdist_group("pipeline_ltdiff")  # shares test_cli's tiny_run
def test_translate_ddpm_sampler_and_bad_t_star(pipeline_dir, tmp_path):
  c = ltdiff_cfg.translate_config(size="tiny", data="phantoms")
  c.data.num_examples = 32
  c.train.progress = False
  c.ddpm_from = str(pipeline_dir / "latent_ddpm")
  c.translate.update(dict(sampler="ddpm", t_star=3, max_slices=2, figure_slices=2))
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  stage = methods.load_method(c, tmp_path / "ok", mesh)
  result = stage.run()
  assert result.metrics["sampler_steps"] == 3 and result.metrics["num_slices"] == 2
  assert len(list((tmp_path / "ok" / "translated" / "A_prime").glob("*.npy"))) == 2
  c.translate.t_star = 51  # T = 50
  with pytest.raises(config_lib.ConfigError, match=r"translate.t_star=51.*\[1, 50\]"):
    methods.load_method(c, tmp_path / "bad", mesh).run()


@pytest.mark.xdist_group("pipeline_ltdiff")  # shares test_cli's tiny_run
def test_direct_and_evaluate_stages_write_table_one(pipeline_dir):
  direct = pipeline_dir / "direct" / "translated"
  assert len(list((direct / "A_prime").glob("*.npy"))) == 8  # eval.translate_slices
  ev = pipeline_dir / "evaluate"
  report = (ev / "report.md").read_text()
  for row in ("| baseline (A) |", "| UNet++ direct |", "| LTDiff++ |"):
    assert row in report, row
  assert "the 8 slices all of them hold" in report  # the same 8 of the 32 in both runs
  assert (ev / "ccc" / "ccc_bars.png").stat().st_size > 1000
  assert (ev / "figures" / "windows.png").stat().st_size > 1000
  last = json.loads((ev / "metrics.jsonl").read_text().splitlines()[-1])
  for row in ("identity", "unetpp_direct", "ltdiff"):
    for cls in ("GLCM", "ID"):
      key = next(k for k in last if k.endswith(f"ccc/{row}/{cls}"))
      assert -1.0 <= last[key] <= 1.0, (key, last[key])
  csv_head = (ev / "ccc" / "ccc.csv").read_text().splitlines()[0]
  assert csv_head == "window,feature,class,n_rois,identity,unetpp_direct,ltdiff"


def test_evaluate_refuses_missing_or_mismatched_runs(tmp_path):
  c = ltdiff_cfg.ltdiff_config(stage="evaluate", size="tiny", data="phantoms")
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  run = lambda: methods.load_method(c, tmp_path / "ev", mesh).run()
  with pytest.raises(config_lib.ConfigError, match="compare lists no run"):
    run()
  c.compare.ltdiff = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match=r"compare.ltdiff=.*nowhere.*lacks \['A', 'A_prime', 'B'\]"):
    run()
  for name, value in (("one", 0.0), ("two", 5.0)):
    for key in translate.FOLDERS:
      (tmp_path / name / "translated" / key).mkdir(parents=True)
      np.save(tmp_path / name / "translated" / key / "s0.npy", np.full((8, 8), value))
  c.compare.update(dict(ltdiff=str(tmp_path / "one"), unetpp_direct=str(tmp_path / "two")))
  with pytest.raises(DataError, match="B/s0.npy differs between compare.ltdiff and compare.unetpp_direct"):
    run()


@pytest.mark.xdist_group("pipeline_ltdiff")  # shares test_cli's tiny_run
def test_joint_step_trains_denoiser_and_decoder_not_the_encoder(pipeline_dir, tmp_path):
  c = ltdiff_cfg.ltdiff_config(stage="joint", size="tiny", data="phantoms")
  c.data.num_examples = 32
  c.train.progress = False
  c.ddpm_from = str(pipeline_dir / "latent_ddpm")
  stage = methods.load_method(c)
  start = stage.init_variables(None, None)["params"]
  params, _, metrics = one_step(c, jax.devices()[:1], tmp_path / "one")
  np.testing.assert_allclose(metrics["loss"], metrics["latent_mse"]
                             + c.joint.lam * metrics["image_mse"], rtol=1e-5)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       start, params)
  for key in joint.FROZEN:
    assert not any(jax.tree.leaves(moved["unetpp"][key])), key
  assert all(jax.tree.leaves(moved["unetpp"]["head_2"]))  # the decoder trains
  assert any(jax.tree.leaves(moved["denoiser"]))
  # The joint run translates with its own decoder; a pixel DDPM cannot be fine-tuned.
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  t = ltdiff_cfg.translate_config(size="tiny", data="phantoms")
  t.ddpm_from, t.ae_from = str(pipeline_dir / "latent_ddpm"), str(pipeline_dir / "ae")
  t.translate.max_slices = 2
  tr = methods.load_method(t, tmp_path / "tr", mesh)
  tr.config.unlock()
  tr.config.ddpm_from = str(pipeline_dir / "ae")
  with pytest.raises(config_lib.ConfigError, match="is a stage 'ae' run"):
    tr.run()
  c.joint.lam = -1.0
  with pytest.raises(config_lib.ConfigError, match="joint.lam"):
    methods.load_method(c)
  c.joint.lam, c.ddpm_from = 1.0, ""
  with pytest.raises(config_lib.ConfigError, match="ddpm_from is empty"):
    methods.load_method(c).model  # pylint: disable=expression-not-assigned
