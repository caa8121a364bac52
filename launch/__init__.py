"""Launch helpers: cluster scripts (SLURM, TPU pods) and `python -m launch.sweep`."""
