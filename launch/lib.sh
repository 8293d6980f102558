# shellcheck shell=bash
# Shell helpers shared by the launch scripts (sourced, not run).

# Quotes one word only where the shell needs it, so printed commands stay readable
# and can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

# Prints a command the way `set -x` would.
show() {
  local out='+' word
  for word in "$@"; do out+=" $(quote "${word}")"; done
  echo "${out}"
}

die() {
  local script
  script="$(basename "$0")"
  echo "${script}: error: $*" >&2
  echo "Run '${script} --help' for usage." >&2
  exit 2
}

# For option parsing: `need_value "$@"` fails unless the option at $1 has a value.
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

# The interpreter to run mmtl with: $1 if given, else the checkout's .venv, else python3.
pick_python() {
  if [[ -n "$1" ]]; then echo "$1"
  elif [[ -x "$2/.venv/bin/python" ]]; then echo "$2/.venv/bin/python"
  else echo python3
  fi
}

# Environment for JAX on NVIDIA GPUs; values already set by the user win.
#   --xla_gpu_enable_latency_hiding_scheduler=true lets XLA overlap the gradient
#     all-reduce of data parallelism (and FSDP's all-gathers) with compute instead
#     of running them back to back.
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.9: JAX preallocates this share of each GPU
#     (default 0.75), leaving more room for activations and larger batches; lower
#     it when other processes share the GPUs.
export_gpu_env() {
  local repo_root="$1"
  if [[ " ${XLA_FLAGS:-} " != *" --xla_gpu_enable_latency_hiding_scheduler="* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:+${XLA_FLAGS} }--xla_gpu_enable_latency_hiding_scheduler=true"
  fi
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"  # mmtl importable from any directory.
}
