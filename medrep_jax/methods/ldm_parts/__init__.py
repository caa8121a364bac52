"""The stages of the `ldm` method (see `medrep_jax/methods/ldm.py`)."""
