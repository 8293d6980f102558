#!/usr/bin/env bash
# Runs mmtl.train on one host with N GPUs.
#
# One process drives all local GPUs (JAX's single-controller model): the mesh in
# the config spans every visible device, so picking GPUs is picking
# CUDA_VISIBLE_DEVICES. For several hosts use launch/slurm.sbatch.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config PATH[:ARG] --workdir DIR [--gpus LIST] [--python PYTHON] [--dry-run] [-- TRAIN_FLAGS...]

  --config PATH[:ARG]  mmtl config, e.g. configs/quickstart.py
  --workdir DIR        run directory (an interrupted run resumes from it)
  --gpus LIST          GPUs to use, e.g. 0,1,2,3 (default: all, or $CUDA_VISIBLE_DEVICES)
  --python PYTHON      interpreter with mmtl's requirements and jax[cuda12]
                       (default: .venv/bin/python if present, else python3)
  --dry-run            print the command only

Everything after `--` is passed to mmtl.train, e.g. -- --config.total_steps=1000

It sets XLA_FLAGS, XLA_PYTHON_CLIENT_MEM_FRACTION and PYTHONPATH (see
export_gpu_env in launch/lib.sh for why); values you set yourself win.
EOF
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# shellcheck source=launch/lib.sh
source "${REPO_ROOT}/launch/lib.sh"
CONFIG=""; WORKDIR=""; GPUS="${CUDA_VISIBLE_DEVICES:-}"; PYTHON=""; DRY_RUN=0; TRAIN_FLAGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) die "unknown option '$1' (flags for mmtl.train go after '--')" ;;
  esac
done
[[ -n "${CONFIG}" ]] || die "--config is required, e.g. --config configs/quickstart.py"
[[ -n "${WORKDIR}" ]] || die "--workdir is required, e.g. --workdir runs/quickstart"
[[ -z "${GPUS}" || "${GPUS}" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--gpus expects comma-separated GPU indices like 0,1,2,3, got '${GPUS}'"
PYTHON="$(pick_python "${PYTHON}" "${REPO_ROOT}")"

export_gpu_env "${REPO_ROOT}"
[[ -z "${GPUS}" ]] || export CUDA_VISIBLE_DEVICES="${GPUS}"

cmd=("${PYTHON}" -m mmtl.train --config "${CONFIG}" --workdir "${WORKDIR}" "${TRAIN_FLAGS[@]}")
shown_env=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION}" "XLA_FLAGS=${XLA_FLAGS}" "PYTHONPATH=${PYTHONPATH}")
[[ -z "${GPUS}" ]] || shown_env=("CUDA_VISIBLE_DEVICES=${GPUS}" "${shown_env[@]}")
show env "${shown_env[@]}" "${cmd[@]}"
[[ "${DRY_RUN}" == 1 ]] || exec "${cmd[@]}"
