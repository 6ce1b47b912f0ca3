#!/usr/bin/env bash
# The tests of the `beam` and `seqio` extras (marker `extras`), in an environment of their own:
# apache-beam needs protobuf < 7 while the main environment's sentencepiece needs >= 7.36. The
# environment sits over the main one's packages (--system-site-packages), so only Beam,
# TensorFlow, seqio and their pins are installed into it. Run after the main installation:
#   bash tests/run_extras.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="${HMEM_EXTRAS_ENV:-$HOME/.cache/hmem_jax/extras-env}"
[[ -x "$env_dir/bin/python" ]] || python -m venv --system-site-packages "$env_dir"
"$env_dir/bin/pip" install -q --no-deps -e .
"$env_dir/bin/pip" install -q -e ".[beam,seqio]"
exec "$env_dir/bin/python" -m pytest -m extras -n 2 "$@"
