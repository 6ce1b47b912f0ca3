#!/usr/bin/env bash
# Train on a TPU pod (one or more slices) on GKE, submitted with XPK (`xpk workload create`).
#
#   launch/xpk.sh --cluster=C --workload=W --docker_image=IMG --tpu_type=v5p-128 [--num_slices=S]
#       [launcher flags] [--] --workdir=gs://BUCKET/runs/x [train flags...]
#
# Runs `xpk workload create` whose --command starts, on every TPU VM of every slice,
#   $HMEM_PYTHON -m hmem_jax.main.train --distributed=auto [train flags...]
# (jax.distributed.initialize() finds the TPU workers and slices by itself). The train flags are
# shell-quoted into that one command line, so gin params with spaces and quotes arrive as given.
# The workdir must be a gs:// URL: the pods share no disk, and a restarted workload lands on
# other VMs. (The trainer takes gs:// workdirs once object-store paths land.)
#
# Preemption: on a disruption GKE sends SIGTERM to the pods; XPK's container script relays it to
# the command, which relays it to the trainer (it checkpoints at the next step boundary and
# exits). A trainer stopped that way that exits 0 is made to exit 42, the status XPK restarts a
# workload on (as it does on 127-255), up to --max_restarts; the restarted trainer resumes from
# the latest checkpoint in the workdir. A trainer that finishes its steps exits 0 and the
# workload completes; a user mistake (status 2) or a crash (1) fails it without restarting.
#
# Launcher flags (anywhere before `--`; everything else goes to the trainer):
#   --cluster=C --workload=W   GKE cluster; workload name (lowercase, digits, '-'; <= 40 chars;
#                              keep it stable across resubmissions)
#   --docker_image=IMG         image with hmem_jax and jax[tpu] installed (xpk --docker-image), or
#   --base_docker_image=IMG    a base image XPK adds this repository to (xpk --base-docker-image
#                              --script-dir=<repo root>)
#   --tpu_type=T               e.g. v5p-128, v6e-256; --num_slices=S (default 1)
#   --project=P --zone=Z       GCP project and zone (default: gcloud's configuration)
#   --max_restarts=R           restarts of the whole workload (default 20)
#   --grace_s=G                seconds a pod gets after SIGTERM (default 120; XPK's default is 30)
#   --priority=P               very-low | low | medium | high | very-high (XPK default medium)
#   --xpk_arg=ARG              any other xpk flag, passed as given (repeatable), e.g.
#                              --xpk_arg=--spot, --xpk_arg=--env=KEY=VALUE
#   --dry_run                  print the xpk command instead of running it
# Environment: HMEM_PYTHON (the image's python, default python3), XPK (the xpk command, default xpk).
set -euo pipefail

# die MESSAGE, quote ARGS...: shared with the other launchers.
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cluster= workload= docker_image= base_docker_image= tpu_type= num_slices=1
project= zone= max_restarts=20 grace_s=120 priority= dry_run=0
xpk_args=()
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --cluster=*) cluster=${1#*=} ;;
    --workload=*) workload=${1#*=} ;;
    --docker_image=*) docker_image=${1#*=} ;;
    --base_docker_image=*) base_docker_image=${1#*=} ;;
    --tpu_type=*) tpu_type=${1#*=} ;;
    --num_slices=*) num_slices=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --grace_s=*) grace_s=${1#*=} ;;
    --priority=*) priority=${1#*=} ;;
    --xpk_arg=*) xpk_args+=("${1#*=}") ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
      exit 2
      ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    --distributed* | --coordinator_address* | --num_processes* | --process_id*)
      die "$1: the processes come from the TPU pod (--distributed=auto); leave these flags out"
      ;;
    *) train_args+=("$1") ;;
  esac
  shift
done

[[ -n $cluster ]] || die "--cluster=C is required"
[[ $workload =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#workload} -le 40 ]] ||
  die "--workload='$workload': lowercase letters, digits and '-', starting with a letter, at most 40 characters"
[[ -n $tpu_type ]] || die "--tpu_type=T is required (e.g. v5p-128)"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$num_slices: expected a count >= 1"
if [[ -z $docker_image$base_docker_image || (-n $docker_image && -n $base_docker_image) ]]; then
  die "pass one of --docker_image=IMG (hmem_jax installed) or --base_docker_image=IMG"
fi
workdir=
previous=
for arg in ${train_args[@]+"${train_args[@]}"}; do
  [[ $arg != --workdir=* ]] || workdir=${arg#*=}
  [[ $previous != --workdir ]] || workdir=$arg
  previous=$arg
done
[[ $workdir == gs://?* ]] || die "pass --workdir=gs://BUCKET/PATH (the pods share no disk); got '${workdir}'"

# What runs in each pod: the trainer, behind a relay that passes XPK's SIGTERM on and turns a
# clean stop after SIGTERM (exit 0) into exit 42, XPK's "restart me". (Its $ are the pod
# shell's, hence the single quotes.)
# shellcheck disable=SC2016
relay=(
  'stopped=0'
  'trap "stopped=1; kill -TERM \$child 2>/dev/null" TERM'
  '"$@" & child=$!'
  'while :; do wait "$child"; status=$?; kill -0 "$child" 2>/dev/null || break; done'
  'if [ "$stopped" = 1 ] && [ "$status" = 0 ]; then echo "xpk.sh: stopped by SIGTERM after a checkpoint; exit 42 to restart"; exit 42; fi'
  'exit "$status"'
)
printf -v relay_script '%s; ' "${relay[@]}"
pod_command=$(quote exec bash -c "${relay_script%; }" hmem-train "${HMEM_PYTHON:-python3}" \
  -m hmem_jax.main.train --distributed=auto ${train_args[@]+"${train_args[@]}"})

command=("${XPK:-xpk}" workload create "--cluster=$cluster" "--workload=$workload")
if [[ -n $docker_image ]]; then
  command+=("--docker-image=$docker_image")
else
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  command+=("--base-docker-image=$base_docker_image" "--script-dir=$repo")
fi
command+=("--tpu-type=$tpu_type" "--num-slices=$num_slices" "--max-restarts=$max_restarts"
  "--termination-grace-period-seconds=$grace_s")
[[ -z $project ]] || command+=("--project=$project")
[[ -z $zone ]] || command+=("--zone=$zone")
[[ -z $priority ]] || command+=("--priority=$priority")
command+=(${xpk_args[@]+"${xpk_args[@]}"} "--command=$pod_command")

if [[ $dry_run == 1 ]]; then
  quote "${command[@]}"
  exit 0
fi
exec "${command[@]}"
