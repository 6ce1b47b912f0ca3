# Functions local.sh and xpk.sh share (sourced, not run). slurm.sbatch keeps its own copy:
# sbatch runs a copy of the script from its spool folder, where this file is not beside it.

# Exit with status 2 and one line naming the script.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Shell-quote each argument the way Python's shlex.quote does, joined by spaces.
quote() {
  local word out=()
  for word in "$@"; do
    if [[ -n $word && $word != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\"\'\"\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}
