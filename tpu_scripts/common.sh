# Shared settings of the Cloud TPU scripts; sourced by create/setup/launch/logs/teardown.
# Every value can be overridden from the environment, e.g.
#   TPU_NAME=lpt-v5e16 ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a ./create.sh

set -euo pipefail

# LOCAL=N: the workers are N processes on this machine (CPU devices, coordinator
# on 127.0.0.1), each with its own home under LOCAL_ROOT; no cloud project is
# needed. launch.sh --local N sets it; it runs the launch path of a pod slice.
: "${LOCAL:=0}"
: "${LOCAL_ROOT:=${TMPDIR:-/tmp}/langptune-local}"  # worker-<i>/ = that process's ~
: "${LOCAL_DEVICES:=4}"                   # CPU devices per local process
: "${LOCAL_PORT:=}"                       # coordinator port; empty: a free one
if [[ "${LOCAL}" != 0 ]]; then
  : "${PROJECT:=local}"
fi

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-west4-a}"
: "${TPU_NAME:=langptune}"
: "${ACCELERATOR_TYPE:=v5litepod-16}"     # v4-8, v4-16, v5litepod-8, v5litepod-16, v5p-8, ...
: "${RUNTIME_VERSION:=}"                  # empty: picked from ACCELERATOR_TYPE below
: "${SPOT:=0}"                            # 1: spot capacity (cheaper, may be preempted)
: "${QUEUED:=0}"                          # 1: request through a queued resource (large slices)
: "${REPO_URL:=}"                         # git URL to clone on workers; empty: copy this checkout
: "${REMOTE_DIR:=langptune-jax}"          # checkout location on every worker (under ~)
: "${REMOTE_VENV:=.venv}"                 # its virtual environment (relative to the checkout)
: "${WORKDIR:=}"                          # shared run dir, e.g. gs://my-bucket/runs/gemma_2b_movies_tv
: "${LOG_DIR:=langptune-logs}"            # per-worker log directory (under ~)

if [[ -z "${PROJECT}" ]]; then
  echo "error: no GCP project: set PROJECT or run 'gcloud config set project ...'" >&2
  exit 2
fi

if [[ -z "${RUNTIME_VERSION}" && "${LOCAL}" == 0 ]]; then
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
  if [[ "${LOCAL}" != 0 ]]; then
    on_local_workers "$1"
  else
    "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=all --command="$1"
  fi
}

# The LOCAL=N stand-in for the slice: the same command in N shells, each with
# HOME=LOCAL_ROOT/worker-<i> (~/REMOTE_DIR links to this checkout) and the
# cluster the TPU runtime would describe given as JAX_* variables.
on_local_workers() {
  local repo_root port i status=0
  local -a pids=()
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  port="${LOCAL_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  for ((i = 0; i < LOCAL; i++)); do
    mkdir -p "${LOCAL_ROOT}/worker-${i}"
    ln -sfn "${repo_root}" "${LOCAL_ROOT}/worker-${i}/${REMOTE_DIR}"
    env HOME="${LOCAL_ROOT}/worker-${i}" \
      LANGPTUNE_CACHE="${LANGPTUNE_CACHE:-${HOME}/.cache/langptune_jax}" \
      JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=${LOCAL_DEVICES} ${LOCAL_XLA_FLAGS:-}" \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="${LOCAL}" \
      JAX_PROCESS_ID="${i}" bash -c "$1" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "${i}" || status=$?; done
  return "${status}"
}

# Runs a shell command on one worker (default 0).
on_worker() {
  local worker="${2:-0}"
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker="${worker}" --command="$1"
}
