"""PyTorch reference models and train steps for side-by-side speed ratios.

Written from the papers (not ported from any codebase) to match the shapes
and FLOPs of the medrep_jax models, so ``torch time / JAX time`` compares the
frameworks rather than the architectures. Needs the ``[bench]`` extra.
"""
