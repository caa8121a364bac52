#!/usr/bin/env bash
# TPU pod slice: the same command on every worker VM.
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/dcl_cstp.py:size=paper gs://bucket/runs/dcl
#
# On TPU VMs jax.distributed.initialize() discovers the slice by itself; --distributed turns
# it on. The workdir must be shared storage (e.g. a GCS bucket path that orbax can write).
# Install first on all workers:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command="pip install -e 'git+<your repo>#egg=medrep_jax[tpu]'"
set -euo pipefail
NAME=${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
ZONE=${2:?}
CONFIG=${3:?}
WORKDIR=${4:?}
shift 4
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/medrep_jax && python -m medrep_jax.main --distributed --config='$CONFIG' --workdir='$WORKDIR' $*"
