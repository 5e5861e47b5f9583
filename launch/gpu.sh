#!/usr/bin/env bash
# Install score_jax with CUDA 12 JAX into ./.venv-gpu on a GPU machine and run a config.
#
#   launch/gpu.sh configs/math.py runs/math [--config.x=y ...]
#
# Rerunning resumes from the workdir's checkpoints. DRY_RUN=1 prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?config file, e.g. configs/math.py}"; workdir="${2:?workdir, e.g. runs/math}"; shift 2
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi; }
if [[ ! -d .venv-gpu ]]; then
  run python3 -m venv .venv-gpu
  run .venv-gpu/bin/pip install -q -U pip
  run .venv-gpu/bin/pip install -q 'jax[cuda12]' -e '.[tfds]'
fi
# XLA preallocates 75% of GPU memory by default; the sampler's KV cache and the loss step
# are sized by the config, so let the allocator grow instead of failing on the first OOM.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
run .venv-gpu/bin/python -m score_jax.main --config="$config" --workdir="$workdir" "$@"
