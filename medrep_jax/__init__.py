"""medrep_jax: medical image representation learning in JAX/Flax."""
from medrep_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

# Before JAX starts a backend: faster CPU convolution training (see medrep_jax/xla_flags.py).
_xla_flags.apply_cpu_defaults()


def __getattr__(name: str):
  """`medrep_jax.load(workdir)` (see medrep_jax/inference.py), imported on first use so
  that `import medrep_jax` stays cheap."""
  if name == "load":
    from medrep_jax.inference import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'medrep_jax' has no attribute {name!r}")
