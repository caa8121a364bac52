#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one process per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/dcl_cstp.py:size=paper runs/dcl
#
# Each task runs `python -m medrep_jax.main --distributed`; jax.distributed.initialize()
# reads the SLURM environment (SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID) to find the coordinator, the process count and this process's id, and
# each process sees its own GPU. Every process loads only its rows of each global batch.
# train.batch_size is the GLOBAL batch (see README: scaling rule).
#SBATCH --job-name=medrep
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --output=slurm-%j.out
set -euo pipefail
CONFIG=${1:?usage: slurm_gpu.sh CONFIG[:variant args] WORKDIR [--config.x=y ...]}
WORKDIR=${2:?usage: slurm_gpu.sh CONFIG WORKDIR}
shift 2
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
srun --kill-on-bad-exit=1 python -m medrep_jax.main --distributed \
  --config="$CONFIG" --workdir="$WORKDIR" "$@"
