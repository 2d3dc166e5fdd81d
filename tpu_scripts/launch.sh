#!/usr/bin/env bash
# Launches one command on every worker at once, in the background, with a shared work dir.
#
#   WORKDIR=gs://my-bucket/runs/gemma_2b_movies_tv \
#     ./tpu_scripts/launch.sh configs/gemma_2b_movies_tv.py --config.mesh.fsdp=16
#
# COMMAND (default: train) is the langptune-jax command. Every worker joins the
# same jax.distributed cluster (the TPU runtime tells JAX who the coordinator
# is), so metrics, checkpoints and the plan land once in WORKDIR (a gs:// path
# or a disk every worker mounts). Each worker logs to ~/${LOG_DIR}/<run>.log;
# stream them with logs.sh.
#
# --local N (first argument) runs the same launch on this machine as N processes
# with LOCAL_DEVICES CPU devices each (see common.sh), then waits for them and
# prints where their logs are; e.g.
#   WORKDIR=/tmp/run ./tpu_scripts/launch.sh --local 2 configs/tiny.py
if [[ "${1:-}" == --local ]]; then
  if [[ ! "${2:-}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --local N: N must be a positive number of processes, got '${2:-}'" >&2
    exit 2
  fi
  export LOCAL="$2"; shift 2
fi
source "$(dirname "$0")/common.sh"

if [[ $# -lt 1 ]]; then
  echo "usage: WORKDIR=gs://... $0 CONFIG.py [--config.field=value ...]" >&2
  exit 2
fi
config="$1"; shift
: "${COMMAND:=train}"
if [[ -z "${WORKDIR}" ]]; then
  echo "error: WORKDIR is empty: set it to a gs:// path (or a shared mount) all workers can reach" >&2
  exit 2
fi
run="$(basename "${config}" .py)-$(date +%Y%m%d-%H%M%S)"
args="$(printf ' %q' "$@")"

# Stop what a previous launch left running (it would hold the TPU), then start;
# the process id goes to ~/${LOG_DIR}/run.pid for teardown.sh.
on_all_workers "mkdir -p ~/${LOG_DIR}; \
  if [ -f ~/${LOG_DIR}/run.pid ]; then kill \$(cat ~/${LOG_DIR}/run.pid) 2>/dev/null || true; sleep 5; fi; \
  cd ~/${REMOTE_DIR} && nohup env PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1 \
  ${REMOTE_VENV}/bin/langptune-jax ${COMMAND} --config=${config} --workdir=${WORKDIR} \
  --config.distributed.initialize=True${args} > ~/${LOG_DIR}/${run}.log 2>&1 < /dev/null & \
  echo \$! > ~/${LOG_DIR}/run.pid; \
  ln -sf ~/${LOG_DIR}/${run}.log ~/${LOG_DIR}/latest.log; echo \"\$(hostname): started ${run}\""
if [[ "${LOCAL}" != 0 ]]; then
  # Local processes: wait for every one (as a pod run would be watched), then say where logs are.
  for ((i = 0; i < LOCAL; i++)); do
    pid="$(cat "${LOCAL_ROOT}/worker-${i}/${LOG_DIR}/run.pid")"
    while kill -0 "${pid}" 2>/dev/null; do sleep 1; done
    echo "worker ${i} finished: log ${LOCAL_ROOT}/worker-${i}/${LOG_DIR}/${run}.log"
  done
  exit 0
fi
echo "logs: ./tpu_scripts/logs.sh   (all workers: WORKER=all ./tpu_scripts/logs.sh)"
