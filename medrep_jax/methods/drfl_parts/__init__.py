"""The stages of the `drfl` method (see `medrep_jax/methods/drfl.py`)."""
