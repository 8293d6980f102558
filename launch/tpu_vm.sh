#!/usr/bin/env bash
# Runs mmtl on a Cloud TPU VM or a multi-host TPU pod slice with gcloud.
#
# One script for the whole loop a researcher does by hand: create (or reuse) the
# VM, ship the code to every worker, install requirements there, start
# `python -m mmtl.train` on all workers at once (a pod slice is one JAX program:
# every host must run it; mmtl.distributed.maybe_initialize calls
# jax.distributed.initialize(), which finds its peers on TPU by itself), stream
# the log, and delete the VM. Every gcloud command is printed before it runs, so
# what happened can be replayed by hand; --dry-run prints them only.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# shellcheck disable=SC2088  # Not expanded here: by the remote shell, to each worker's home.
readonly REMOTE_DIR='~/mmtl'
# shellcheck source=launch/lib.sh
source "${REPO_ROOT}/launch/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [-- TRAIN_FLAGS...]

Commands:
  up       create the TPU VM unless it exists, copy the code to all workers and
           install the requirements (jax[tpu]) into ~/mmtl/.venv on each
  run      `up`, then start `python -m mmtl.train` on all workers (detached, so a
           dropped ssh does not kill training) and stream worker 0's log
  logs     stream the log of the current or last run (Ctrl-C stops streaming only)
  stop     stop training on all workers: SIGTERM, so the trainers save the step they
           reached and exit (status 75); `run` again continues from that step
  delete   delete the TPU VM

Options:
  --name NAME              TPU VM name (default: $TPU_NAME)
  --zone ZONE              zone, e.g. us-central2-b (default: $TPU_ZONE)
  --project PROJECT        GCP project (default: gcloud's configured project)
  --accelerator-type TYPE  e.g. v4-8 (one host), v4-32 (4 hosts)
                           (default: $TPU_ACCELERATOR_TYPE, else v4-8)
  --version VERSION        TPU runtime image (default: tpu-ubuntu2204-base)
  --spot                   create a spot VM (cheaper). A preemption sends SIGTERM: the
                           trainers save the step they reached and exit; then `delete`
                           and `run` again with the same flags, which resumes from that
                           step (use a gs:// workdir: the VM's disk goes with it)
  --repo URL               git clone/fetch URL on the workers instead of copying
                           this working tree (tracked + untracked, not ignored)
  --ref REF                branch, tag or commit to check out with --repo (default: HEAD)
  --python-version X.Y     Python of the workers' venv, made with uv (default: 3.11)
  --config PATH[:ARG]      mmtl config for `run`, e.g. configs/quickstart.py
  --workdir DIR            run directory for `run`; on a multi-host slice every host
                           must see the same checkpoints: gs://BUCKET/..., or a path
                           all workers mount with --shared-workdir
  --shared-workdir         the --workdir is on a filesystem all workers share (e.g. NFS)
  --env KEY=VALUE          environment variable for the training processes
                           (repeatable), e.g. --env TFDS_DATA_DIR=gs://BUCKET/tfds
  --worker N               worker whose log `logs` streams (default: 0)
  --no-follow              `run` returns once training has started
  --delete-after           `run` deletes the VM after training exits (implies follow)
  --dry-run                print the commands only
  -h, --help               this message

Everything after `--` is passed to mmtl.train, e.g. -- --config.total_steps=1000

Queued resources: a VM made by `gcloud compute tpus queued-resources create QR
--node-id NAME --spot ...` is a TPU VM named NAME to this script. When it is preempted
its queued resource goes to SUSPENDED or FAILED; delete it (`gcloud compute tpus
queued-resources delete QR --force --zone ZONE`), create it again, and once NAME is
READY give the same `run` command: it reuses the READY VM, and the trainer resumes from
the step it saved when the preemption's SIGTERM came.

Example (4-host v4-32 pod slice):
  launch/tpu_vm.sh run --name mmtl-v4-32 --zone us-central2-b --accelerator-type v4-32 \
    --config configs/quickstart.py --workdir gs://my-bucket/mmtl/quickstart \
    --env TFDS_DATA_DIR=gs://my-bucket/tfds
EOF
}

# Quotes one word for a command string the workers' shell runs (backslashes, not
# quotes, so the printed gcloud command needs just one level of quoting).
remote_word() {
  printf '%q' "$1"
}

# Prints a command, then runs it unless --dry-run.
run_cmd() {
  show "$@"
  [[ "${DRY_RUN}" == 1 ]] || "$@"
}

# Whether the slice spans several TPU VM hosts. Every generation's single-host maximum is
# "-8" (v2/v3/v4/v5p count TensorCores, 8 per host; v5litepod/v6e count chips and
# their 8-chip slices are one host), so anything above 8 spans several hosts.
is_multi_host() {
  local size="${ACCELERATOR_TYPE##*-}"
  [[ "${size}" =~ ^[0-9]+$ ]] || die "cannot read the slice size from --accelerator-type ${ACCELERATOR_TYPE}; expected a type like v4-8 or v5litepod-16"
  (( size > 8 ))
}

# Sets CMD to a gcloud tpu-vm command, with --zone (which every one of them
# needs) and --project right after its positional arguments.
tpu_cmd() {
  CMD=(gcloud compute tpus tpu-vm)
  while [[ $# -gt 0 && "$1" != --* ]]; do CMD+=("$1"); shift; done
  CMD+=("--zone=${ZONE}")
  [[ -z "${PROJECT}" ]] || CMD+=("--project=${PROJECT}")
  CMD+=("$@")
}

gcloud_tpu() {
  tpu_cmd "$@"
  run_cmd "${CMD[@]}"
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND
  gcloud_tpu ssh "${NAME}" "--worker=$1" --command "$2"
}

create_vm() {
  tpu_cmd describe "${NAME}" '--format=value(state)'
  show "${CMD[@]}"
  local state=""
  # A dry run takes the VM as absent, to show everything a first launch does.
  [[ "${DRY_RUN}" == 1 ]] || state="$("${CMD[@]}" 2>/dev/null || true)"
  case "${state}" in
    "")
      local args=("${NAME}" "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${VERSION}")
      [[ "${SPOT}" == 0 ]] || args+=(--spot)
      gcloud_tpu create "${args[@]}" ;;
    READY) echo "TPU VM ${NAME} exists; reusing it." ;;
    *) die "TPU VM ${NAME} exists but is ${state}, not READY; delete it (launch/tpu_vm.sh delete --name ${NAME} --zone ${ZONE}) and run again (a preempted spot VM cannot be restarted)" ;;
  esac
}

# Ships the code: this working tree as a tarball, or a git checkout of --repo.
copy_code() {
  if [[ -n "${REPO_URL}" ]]; then
    on_workers all "set -e; [ -d ${REMOTE_DIR}/.git ] || git clone -q $(remote_word "${REPO_URL}") ${REMOTE_DIR}; git -C ${REMOTE_DIR} fetch -q origin $(remote_word "${REF}"); git -C ${REMOTE_DIR} checkout -q --force FETCH_HEAD"
    return
  fi
  git -C "${REPO_ROOT}" rev-parse --git-dir >/dev/null 2>&1 \
    || die "${REPO_ROOT} is not a git checkout, so the files to copy are unknown; pass --repo URL to have the workers clone the code instead"
  local tarball="${TMPDIR:-/tmp}/mmtl-code-${NAME}.tgz"
  run_cmd bash -c "cd $(quote "${REPO_ROOT}") && git ls-files -z --cached --others --exclude-standard | tar -czf $(quote "${tarball}") --null -T -"
  gcloud_tpu scp "${tarball}" "${NAME}:mmtl.tgz" --worker=all
  on_workers all "set -e; mkdir -p ${REMOTE_DIR}; tar -xzf mmtl.tgz -C ${REMOTE_DIR}; rm mmtl.tgz"
}

# jax>=0.10 needs Python>=3.11, newer than the runtime images' python3; uv
# fetches a matching interpreter and installs fast on every worker at once.
# etils[epath-gcs] (gcsfs) is how the trainer and orbax reach gs:// workdirs and
# TFDS data dirs without TensorFlow; it is too heavy for requirements.txt.
install_requirements() {
  on_workers all "set -e; cd ${REMOTE_DIR}; command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || python3 -m pip install -q --user uv; export PATH=~/.local/bin:\$PATH; [ -x .venv/bin/python ] || uv venv -q --python $(remote_word "${PYTHON_VERSION}") .venv; uv pip install -q --python .venv/bin/python -r requirements.txt \"jax[tpu]\" \"etils[epath-gcs]\""
}

start_training() {
  local train_cmd="" word
  for word in "${ENV_VARS[@]}"; do train_cmd+="$(remote_word "${word}") "; done
  train_cmd+=".venv/bin/python -m mmtl.train --config $(remote_word "${CONFIG}") --workdir $(remote_word "${WORKDIR}")"
  for word in "${TRAIN_FLAGS[@]}"; do train_cmd+=" $(remote_word "${word}")"; done
  # The pid file lets `logs` stop streaming when training exits and `stop` find
  # the process; a second run on a busy VM would fight the first for the TPU.
  on_workers all "set -e; cd ${REMOTE_DIR}; if [ -f train.pid ] && kill -0 \"\$(cat train.pid)\" 2>/dev/null; then echo \"a run is still going on this TPU VM: launch/tpu_vm.sh stop it first\" >&2; exit 1; fi; setsid nohup env ${train_cmd} >train.log 2>&1 </dev/null & echo \$! >train.pid"
}

stream_log() {
  on_workers "${WORKER}" "tail -n +1 -F --pid=\"\$(cat ${REMOTE_DIR}/train.pid)\" ${REMOTE_DIR}/train.log"
}

stop_training() {
  # setsid made the trainer a process group leader: this also stops its data workers.
  on_workers all "if [ -f ${REMOTE_DIR}/train.pid ]; then kill -TERM -- -\"\$(cat ${REMOTE_DIR}/train.pid)\" 2>/dev/null || true; fi"
}

delete_vm() {
  gcloud_tpu delete "${NAME}" --quiet
}

# ---- Arguments ---------------------------------------------------------------
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
COMMAND="$1"; shift
case "${COMMAND}" in
  -h|--help) usage; exit 0 ;;
  up|run|logs|stop|delete) ;;
  *) die "unknown command '${COMMAND}'; expected one of: up, run, logs, stop, delete" ;;
esac

NAME="${TPU_NAME:-}"; ZONE="${TPU_ZONE:-}"; PROJECT=""
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"; VERSION="tpu-ubuntu2204-base"; SPOT=0
REPO_URL=""; REF="HEAD"; PYTHON_VERSION="3.11"
CONFIG=""; WORKDIR=""; SHARED_WORKDIR=0; ENV_VARS=(); WORKER=0
FOLLOW=1; DELETE_AFTER=0; DRY_RUN=0; TRAIN_FLAGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --repo) need_value "$@"; REPO_URL="$2"; shift 2 ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --shared-workdir) SHARED_WORKDIR=1; shift ;;
    --env)
      need_value "$@"
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$2'"
      ENV_VARS+=("$2"); shift 2 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) die "unknown option '$1' (flags for mmtl.train go after '--')" ;;
  esac
done

[[ -n "${NAME}" ]] || die "--name is required (or set TPU_NAME)"
[[ -n "${ZONE}" ]] || die "--zone is required (or set TPU_ZONE)"
[[ "${WORKER}" =~ ^[0-9]+$ ]] || die "--worker expects a worker index, got '${WORKER}'"
if [[ "${COMMAND}" == run ]]; then
  [[ -n "${CONFIG}" ]] || die "run needs --config, e.g. --config configs/quickstart.py"
  [[ -n "${WORKDIR}" ]] || die "run needs --workdir, e.g. --workdir gs://BUCKET/mmtl/quickstart"
  if is_multi_host && [[ "${WORKDIR}" != gs://* && "${SHARED_WORKDIR}" == 0 ]]; then
    die "${ACCELERATOR_TYPE} spans several hosts, which must all write one checkpoint: pass a shared --workdir gs://BUCKET/..., not '${WORKDIR}' (or add --shared-workdir if all workers mount it)"
  fi
  [[ "${FOLLOW}" == 1 || "${DELETE_AFTER}" == 0 ]] || die "--delete-after waits for training to end; drop --no-follow"
fi
command -v gcloud >/dev/null || [[ "${DRY_RUN}" == 1 ]] \
  || die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"

# ---- Main --------------------------------------------------------------------
case "${COMMAND}" in
  up)
    create_vm; copy_code; install_requirements ;;
  run)
    create_vm; copy_code; install_requirements; start_training
    if [[ "${FOLLOW}" == 1 ]]; then stream_log; fi
    if [[ "${DELETE_AFTER}" == 1 ]]; then delete_vm; fi ;;
  logs) stream_log ;;
  stop) stop_training ;;
  delete) delete_vm ;;
esac
