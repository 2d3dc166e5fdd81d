# Shared settings of the Cloud TPU scripts; sourced by create/setup/launch/logs/teardown.
# Every value can be overridden from the environment, e.g.
#   TPU_NAME=lpt-v5e16 ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a ./create.sh

set -euo pipefail

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-west4-a}"
: "${TPU_NAME:=langptune}"
: "${ACCELERATOR_TYPE:=v5litepod-16}"     # v4-8, v4-16, v5litepod-8, v5litepod-16, v5p-8, ...
: "${RUNTIME_VERSION:=}"                  # empty: picked from ACCELERATOR_TYPE below
: "${SPOT:=0}"                            # 1: spot capacity (cheaper, may be preempted)
: "${QUEUED:=0}"                          # 1: request through a queued resource (large slices)
: "${REPO_URL:=}"                         # git URL to clone on workers; empty: copy this checkout
: "${REMOTE_DIR:=langptune-jax}"          # checkout location on every worker (under ~)
: "${WORKDIR:=}"                          # shared run dir, e.g. gs://my-bucket/runs/gemma_2b_movies_tv
: "${LOG_DIR:=langptune-logs}"            # per-worker log directory (under ~)

if [[ -z "${PROJECT}" ]]; then
  echo "error: no GCP project: set PROJECT or run 'gcloud config set project ...'" >&2
  exit 2
fi

if [[ -z "${RUNTIME_VERSION}" ]]; then
  case "${ACCELERATOR_TYPE}" in
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) echo "error: ACCELERATOR_TYPE=${ACCELERATOR_TYPE}: set RUNTIME_VERSION too" >&2; exit 2 ;;
  esac
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm --project="${PROJECT}" --zone="${ZONE}")

# Runs a shell command on every worker of the slice, in parallel.
on_all_workers() {
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="$1"
}

# Runs a shell command on one worker (default 0).
on_worker() {
  local worker="${2:-0}"
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker="${worker}" --command="$1"
}
