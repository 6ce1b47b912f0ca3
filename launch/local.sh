#!/usr/bin/env bash
# Start N processes of the trainer on this machine, joined by jax.distributed on loopback.
#
#   launch/local.sh N [launcher flags] [--] [train flags...]
#
# Each process runs `$HMEM_PYTHON -m hmem_jax.main.train --coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=I [train flags...]` (I = 0..N-1, one free PORT for all). Its
# output lines are shown prefixed with `[I] `. The launcher waits for all of them; when one
# fails it stops the others (SIGTERM, then SIGKILL after HMEM_KILL_GRACE_S, default 5 s) and
# exits with that process's status. SIGTERM and SIGINT sent to the launcher are forwarded to
# every process (the trainer checkpoints at the next step boundary and exits); it then exits 0
# if all of them did.
#
# Launcher flags (anywhere before `--`; everything else goes to every process unchanged):
#   --devices_per_process=K  K fake CPU devices per process: XLA_FLAGS gets
#                            --xla_force_host_platform_device_count=K and JAX_PLATFORMS=cpu
#                            (also HMEM_DEVICES_PER_PROCESS=K)
#   --port=P                 coordinator port (also HMEM_COORDINATOR_PORT; default: a free one)
#   --module=M               python module to run (default hmem_jax.main.train)
#   --log_dir=DIR            also write each process's raw output to DIR/process_I.log
#   --dry_run                print the N commands (one a line, shell-quoted) and exit
# Environment: HMEM_PYTHON (default python), HMEM_KILL_GRACE_S (default 5).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

# die MESSAGE, quote ARGS...: shared with the other launchers.
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -ge 1 ]] || usage
[[ $1 =~ ^[1-9][0-9]*$ ]] || die "the first argument is the number of processes (>= 1), got '$1'"
num_processes=$1
shift

devices=${HMEM_DEVICES_PER_PROCESS:-}
port=${HMEM_COORDINATOR_PORT:-}
module=hmem_jax.main.train
log_dir=
dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    --coordinator_address* | --num_processes* | --process_id* | --distributed*)
      die "$1: local.sh sets the coordinator, process count and process ids itself"
      ;;
    *) train_args+=("$1") ;;
  esac
  shift
done
[[ -z $devices || $devices =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process=$devices: expected a count >= 1"
python=${HMEM_PYTHON:-python}
grace=${HMEM_KILL_GRACE_S:-5}

if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
    die "could not pick a free port with $python (set HMEM_PYTHON, or pass --port=P)"
fi
[[ $port =~ ^[0-9]+$ ]] || die "--port=$port: expected a port number"

# The environment every process gets on top of this one's (shown by --dry_run).
env_names=(PYTHONUNBUFFERED)
env_values=(1)
if [[ -n $devices ]]; then
  xla_flags=()
  read -ra inherited <<<"${XLA_FLAGS:-}"
  for flag in ${inherited[@]+"${inherited[@]}"}; do
    [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$flag")
  done
  xla_flags+=("--xla_force_host_platform_device_count=$devices")
  env_names+=(XLA_FLAGS JAX_PLATFORMS)
  env_values+=("${xla_flags[*]}" cpu)
fi

command_of() { # the argv of process $1
  command_argv=("$python" -m "$module" "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$num_processes" "--process_id=$1" ${train_args[@]+"${train_args[@]}"})
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i"
    assignments=()
    for j in "${!env_names[@]}"; do
      assignments+=("${env_names[j]}=$(quote "${env_values[j]}")")
    done
    printf '%s %s\n' "${assignments[*]}" "$(quote "${command_argv[@]}")"
  done
  exit 0
fi

if [[ -n $log_dir ]]; then
  mkdir -p "$log_dir"
fi

prefix() { # copy stdin to stdout as "[id] line" (and raw to log file $2, if given)
  trap '' TERM INT # outlive the trainer's last lines when the signals reach this process group
  local line
  if [[ -n ${2:-} ]]; then
    exec 3>"$2"
  fi
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
    if [[ -n ${2:-} ]]; then
      printf '%s\n' "$line" >&3
    fi
  done
}

# Each process runs in a job of its own (set -m: its own process group, SIGINT not ignored),
# a subshell that pipes the trainer's output through `prefix` and exits with the trainer's
# status; signals go to the whole group, where only the trainer acts on them.
for j in "${!env_names[@]}"; do
  export "${env_names[j]}=${env_values[j]}"
done
pids=()
signal_all() { # signal $1 to every process still running
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill -s "$1" -- "-$pid" 2>/dev/null || true
  done
}
forwarded=0
forward() {
  echo "local.sh: $1 received; forwarding it to the $num_processes processes" >&2
  forwarded=1
  signal_all "$1"
}
trap 'forward TERM' TERM
trap 'forward INT' INT
set -m
for ((i = 0; i < num_processes && !forwarded; i++)); do
  command_of "$i"
  log=${log_dir:+$log_dir/process_$i.log}
  (
    set +e
    trap ':' TERM INT
    "${command_argv[@]}" </dev/null 2>&1 | prefix "$i" "$log"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=("$!")
done
set +m

status=0
failed_at=
running=${#pids[@]}
declare -A done_pids=()
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    [[ -z ${done_pids[$pid]:-} ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    done_pids[$pid]=1
    running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      failed_at=$SECONDS
      if ((running > 0 && !forwarded)); then
        echo "local.sh: process $i exited with status $rc; stopping the other processes" >&2
        signal_all TERM
      fi
    fi
  done
  if [[ -n $failed_at ]] && ((running > 0 && SECONDS - failed_at >= grace)); then
    echo "local.sh: processes still running ${grace}s after the failure; killing them" >&2
    signal_all KILL
    failed_at=$SECONDS
  fi
  ((running == 0)) || sleep 0.2
done
exit "$status"
