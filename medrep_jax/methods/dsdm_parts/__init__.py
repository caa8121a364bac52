"""The stages of the `dsdm` method (see `medrep_jax/methods/dsdm.py`)."""
