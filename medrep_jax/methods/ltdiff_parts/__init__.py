"""The stages of the `ltdiff` method (see `medrep_jax/methods/ltdiff.py`)."""
