#!/usr/bin/env bash
# Installs the package (and JAX for TPU) on every worker of the slice.
#
# With REPO_URL set, every worker clones it; otherwise this checkout (tracked
# and untracked files, without runs/ and virtual environments) is copied to
# every worker. Offline assets are fetched with `langptune-jax assets`.
source "$(dirname "$0")/common.sh"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"

if [[ -n "${REPO_URL}" ]]; then
  on_all_workers "rm -rf ~/${REMOTE_DIR} && git clone --depth 1 ${REPO_URL} ~/${REMOTE_DIR}"
else
  archive="$(mktemp -t langptune-src-XXXX.tar.gz)"
  tar -C "${repo_root}" --exclude=.git --exclude=.venv --exclude=runs --exclude='*.egg-info' \
    --exclude=__pycache__ -czf "${archive}" .
  "${GCLOUD_TPU[@]}" scp "${archive}" "${TPU_NAME}:~/langptune-src.tar.gz" --worker=all
  rm -f "${archive}"
  on_all_workers "rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && \
    tar -C ~/${REMOTE_DIR} -xzf ~/langptune-src.tar.gz && rm ~/langptune-src.tar.gz"
fi

# One virtual environment per worker; jax[tpu] brings libtpu.
on_all_workers "set -e; cd ~/${REMOTE_DIR} && python3 -m venv .venv && \
  .venv/bin/pip install -q -U pip && \
  .venv/bin/pip install -q -U 'jax[tpu]' && \
  .venv/bin/pip install -q -e . && \
  .venv/bin/langptune-jax assets >/dev/null && \
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
echo "next: WORKDIR=gs://BUCKET/runs/NAME ./tpu_scripts/launch.sh configs/CONFIG.py [--config.x=y ...]"
