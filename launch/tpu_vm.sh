#!/usr/bin/env bash
# Create a Cloud TPU VM, install score_jax on every host of it, run a config, fetch results.
#
#   TPU_NAME=score ZONE=us-central2-b ACCELERATOR=v4-8 launch/tpu_vm.sh create
#   TPU_NAME=score ZONE=us-central2-b launch/tpu_vm.sh setup          # copy this checkout + pip install
#   TPU_NAME=score ZONE=us-central2-b launch/tpu_vm.sh copy  ~/gemma-2-2b-it ~/data   # weights, data
#   TPU_NAME=score ZONE=us-central2-b launch/tpu_vm.sh run configs/math.py runs/math [--config.x=y ...]
#   TPU_NAME=score ZONE=us-central2-b launch/tpu_vm.sh fetch runs/math/eval
#   TPU_NAME=score ZONE=us-central2-b launch/tpu_vm.sh delete
#
# `run` starts the same command on every host (--worker=all) inside `nohup`, logging to
# ~/score_jax/<workdir>.log; rerunning it resumes from the workdir's checkpoints. On a
# multi-host slice (v4-16 and up) it adds --distributed so hosts find each other.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"            # v4-8 (4 chips, 32 GiB each) or v5litepod-8 (8 chips, 16 GiB)
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"     # v5e: v2-alpha-tpuv5-lite
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR="score_jax"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

gc() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf 'gcloud'; printf ' %q' "$@"; printf '\n'; else gcloud "$@"; fi
}
ssh_all() { gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"; }

# One host has 4 v4/v5p chips (the type counts 8 TensorCores) or 8 v5e/v6e chips: either
# way, a type number above 8 means several hosts.
multi_host() { (( ${ACCELERATOR##*-} > 8 )); }

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  setup)
    archive="$(mktemp -d)/score_jax.tar.gz"
    git -C "$REPO" archive --format=tar.gz -o "$archive" HEAD
    gc compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/" --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/score_jax.tar.gz -C ~/$REMOTE_DIR && \
      cd ~/$REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && \
      pip install -q -U pip && pip install -q 'jax[tpu]' -e '.[tfds]' && \
      python -c 'import jax; print(jax.devices())'" ;;
  copy)  # Local paths -> the same relative layout under ~/score_jax on every host.
    for path in "$@"; do
      gc compute tpus tpu-vm scp --recurse "$path" "$TPU_NAME:~/$REMOTE_DIR/" --zone="$ZONE" \
        $PROJECT_FLAG --worker=all
    done ;;
  run)
    config="${1:?config file, e.g. configs/math.py}"; workdir="${2:?workdir, e.g. runs/math}"; shift 2
    extra="$*"
    if multi_host; then extra="--distributed $extra"; fi
    ssh_all "cd ~/$REMOTE_DIR && . .venv/bin/activate && mkdir -p \"\$(dirname $workdir)\" && \
      nohup python -m score_jax.main --config=$config --workdir=$workdir $extra \
      > $workdir.log 2>&1 & echo started; tail -n 2 $workdir.log || true" ;;
  fetch)
    gc compute tpus tpu-vm scp --recurse "$TPU_NAME:~/$REMOTE_DIR/${1:?path}" "${2:-.}" \
      --zone="$ZONE" $PROJECT_FLAG --worker=0 ;;
  ssh)
    gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker="${1:-0}" ;;
  delete)
    gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
