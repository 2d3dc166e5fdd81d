#!/usr/bin/env bash
# Streams the latest run's log: worker 0 by default, WORKER=all for every worker
# (lines prefixed by the host name), WORKER=N for one. Ctrl-C stops streaming only.
source "$(dirname "$0")/common.sh"
: "${WORKER:=0}"
: "${LINES_BACK:=100}"
"${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker="${WORKER}" \
  --command="tail -n ${LINES_BACK} -F ~/${LOG_DIR}/latest.log | sed -u \"s/^/\$(hostname): /\""
