#!/usr/bin/env bash
# Run a job on every worker of a GCP TPU pod slice; jax.distributed starts from the pod's metadata.
# Usage: launch/tpu_pod.sh TPU_NAME ZONE --gin_file=gin/experiments/... [--gin_param=...] [--workdir=gs://...]
# The checkout must exist at the same path on every worker (e.g. `git clone` in a previous --command).
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/cotsafe_jax && . .venv/bin/activate && python launch/tpu_run.py$args"
