"""The library under the methods: train state, optimizers, meshes, checkpoints, finished runs.

Nothing here imports `methods`, `train` or `eval`; see docs/architecture.md for the layers.
"""
