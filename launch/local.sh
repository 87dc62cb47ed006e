#!/usr/bin/env bash
# Train on this machine with NPROC local ranks (torchrun; gloo on CPU, NCCL on GPUs).
#   launch/local.sh NPROC CONFIG [section.key=value ...]
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/local.sh NPROC CONFIG [section.key=value ...]" >&2
  exit 2
fi
nproc=$1; config=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
# Check config, shards and run dir once, in one process, so mistakes print one line.
"$PYTHON" -m dist_contrast.cli train --config "$config" "$@" --check --world "$nproc" >/dev/null
# Share the cores between ranks unless the user chose.
cores=$("$PYTHON" -c 'import os; print(len(os.sched_getaffinity(0)))')
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
# A rank that fails appends its one-line error to this file; it is printed again at the end,
# after torchrun's report, so the cause is the last line on the screen.
errors=$(mktemp "${TMPDIR:-/tmp}/dist-contrast-error.XXXXXX")
export DIST_CONTRAST_ERROR_FILE=$errors
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
  -m dist_contrast.cli train --config "$config" "$@" &
pid=$!
# torchrun runs in the background so that a signal to this script is passed on at once.
trapped=0
trap 'trapped=1; kill -TERM "$pid" 2>/dev/null || true' TERM
trap 'trapped=1; kill -INT "$pid" 2>/dev/null || true' INT
while :; do
  trapped=0
  if wait "$pid"; then rc=0; else rc=$?; fi
  [ "$trapped" = 1 ] || break  # a trap cut the wait short: torchrun's status is still to come
done
if [ "$rc" -ne 0 ] && [ -s "$errors" ]; then
  head -n 1 "$errors" >&2
fi
rm -f "$errors"
exit "$rc"
