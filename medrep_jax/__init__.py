"""medrep_jax: medical image representation learning in JAX/Flax."""
from medrep_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

# Before JAX starts a backend: faster CPU convolution training (see medrep_jax/xla_flags.py).
_xla_flags.apply_cpu_defaults()
