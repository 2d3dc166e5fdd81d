#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice (all workers), directly or as a queued resource.
#
#   TPU_NAME=lpt ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a ./tpu_scripts/create.sh
#
# A slice with N chips has N/4 (v4, v5p) or N/4..N/8 (v5e) workers; every later
# script addresses all of them (--worker=all).
source "$(dirname "$0")/common.sh"

extra=()
[[ "${SPOT}" == 1 ]] && extra+=(--spot)

if [[ "${QUEUED}" == 1 ]]; then
  gcloud compute tpus queued-resources create "${TPU_NAME}-qr" \
    --project="${PROJECT}" --zone="${ZONE}" --node-id="${TPU_NAME}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" "${extra[@]}"
  echo "queued ${TPU_NAME}-qr; waiting until the slice is ACTIVE (Ctrl-C keeps it queued)"
  until [[ "$(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --project="${PROJECT}" \
      --zone="${ZONE}" --format='value(state.state)')" == ACTIVE ]]; do
    sleep 30
  done
else
  "${GCLOUD_TPU[@]}" create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" "${extra[@]}"
fi

"${GCLOUD_TPU[@]}" describe "${TPU_NAME}" --format='value(state,acceleratorType,networkEndpoints[].ipAddress)'
echo "next: ./tpu_scripts/setup.sh"
