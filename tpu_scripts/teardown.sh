#!/usr/bin/env bash
# Stops the run and deletes the slice (and its queued resource). The work dir
# (gs://...) is kept: checkpoints, metrics and the exported model stay there.
source "$(dirname "$0")/common.sh"
"${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" --worker=all \
  --command="[ -f ~/${LOG_DIR}/run.pid ] && kill \$(cat ~/${LOG_DIR}/run.pid) 2>/dev/null; true" \
  || true  # the slice may already be gone
if [[ "${QUEUED}" == 1 ]]; then
  gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --project="${PROJECT}" \
    --zone="${ZONE}" --force --quiet
else
  "${GCLOUD_TPU[@]}" delete "${TPU_NAME}" --quiet
fi
