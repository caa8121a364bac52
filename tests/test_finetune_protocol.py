"""finetune: the CAMContrast downstream protocol preset (Table A.1) and the training
augmentation of Table 2 (`augment`), off by default."""
import jax
import numpy as np
import pytest

from medrep_jax.config_lib import ConfigError
from medrep_jax.data import augment
from medrep_jax.methods import load_method

from conftest import config_module, load_config

finetune = config_module("finetune")


def test_default_configs_do_not_augment():
  """Without the protocol the `augment` block is the identity and the step is unchanged."""
  for task in ("classification", "segmentation"):
    c = load_config("finetune", f"size=tiny,task={task}")
    assert dict(c.augment) == augment.DOWNSTREAM_OFF
    assert load_method(c).augment_kwargs is None
    assert c.optim.name == "adamw"  # the DCL-CsTP values (Sec. III-E) stay the default


def test_camcontrast_protocol_is_table_a1_and_table_2():
  seg = finetune.get_config("task=segmentation,protocol=camcontrast")
  assert (seg.optim.name, seg.optim.momentum, seg.optim.weight_decay, seg.optim.schedule,
          seg.optim.lr) == ("sgd", 0.9, 1e-5, "cosine", 1e-2)
  assert (seg.train.num_epochs, seg.train.batch_size, seg.train.eval_split) == (60.0, 5, "val")
  assert seg.data.val_fraction == 0.2
  assert load_method(seg).augment_kwargs == dict(scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                                 flip_p=0.5, degrees=30.0, fill="zero")
  assert seg.optim.lr in finetune.CAMCONTRAST_SEG_LRS
  cls = finetune.get_config("task=classification,protocol=camcontrast")
  assert (cls.optim.name, cls.optim.weight_decay, cls.train.batch_size) == ("sgd", 0.0, 40)
  assert (tuple(cls.augment.crop_scale), tuple(cls.augment.crop_ratio)) == ((0.8, 1.0),
                                                                          (0.75, 1.33))
  assert cls.optim.lr in finetune.CAMCONTRAST_CLS_LRS


def test_segmentation_augment_moves_the_mask_with_the_image():
  c = load_config("finetune", "size=tiny,task=segmentation,protocol=camcontrast")
  c.augment.rotate_degrees = 90.0
  method = load_method(c)
  rng = np.random.default_rng(0)
  mask = np.zeros((4, 16, 16), np.uint8)
  for i, (y, x) in enumerate(rng.integers(2, 9, (4, 2))):
    mask[i, y:y + 5, x:x + 6] = 1
  batch = {"image": mask[..., None].astype(np.float32), "mask": mask,
           "index": np.arange(4, dtype=np.int32), "label": np.zeros(4, np.int32)}
  out = jax.jit(method.augment)(jax.random.key(3), batch)
  image, moved = np.asarray(out["image"][..., 0]), np.asarray(out["mask"])
  assert moved.dtype == np.uint8 and out["image"].dtype == np.float32
  assert np.abs(image - batch["image"][..., 0]).max() > 0.5  # something moved
  agree = ((image > 0.5) == (moved == 1)).mean()
  assert agree > 0.97, agree  # ... and the mask moved with it
  np.testing.assert_array_equal(out["label"], batch["label"])


@pytest.mark.parametrize("override, match", [
    (("augment", "flip_p", 2.0), r"augment\.flip_p=2\.0"),
    (("augment", "crop_scale", (0.5, 2.0)), r"augment\.crop_scale"),
    (("data", "normalize", "standardize"), r"data\.normalize='standardize'"),
])
def test_bad_augment_config_fails_when_the_method_is_built(override, match):
  c = load_config("finetune", "size=tiny,task=segmentation,protocol=camcontrast")
  section, field, value = override
  c[section][field] = value
  with pytest.raises(ConfigError, match=match):
    load_method(c)
