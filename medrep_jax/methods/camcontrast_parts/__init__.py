"""The stages of the `camcontrast` method (see `medrep_jax/methods/camcontrast.py`)."""
