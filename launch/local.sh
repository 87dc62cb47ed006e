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
# after torchrun's report, so the cause is the last line on the screen. A preempted run (a stop
# signal to this script, to torchrun or to a rank) writes its line "preempted at step N; ..."
# to the other: then this script ends with it and exit code 75, whatever torchrun reported
# (the ranks exit 0 after a stop they agreed on; torchrun itself fails when signalled).
EXIT_PREEMPTED=75  # dist_contrast.train.preempt.EXIT_PREEMPTED
errors=$(mktemp "${TMPDIR:-/tmp}/dist-contrast-error.XXXXXX")
preempted=$(mktemp "${TMPDIR:-/tmp}/dist-contrast-preempted.XXXXXX")
export DIST_CONTRAST_ERROR_FILE=$errors DIST_CONTRAST_PREEMPT_FILE=$preempted
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
  -m dist_contrast.cli train --config "$config" "$@" &
pid=$!
# torchrun runs in the background so that a signal to this script is passed on at once: TERM
# and INT to torchrun (which passes them on to the ranks), USR1 to the ranks (torchrun would
# die of it).
trapped=0
trap 'trapped=1; kill -TERM "$pid" 2>/dev/null || true' TERM
trap 'trapped=1; kill -INT "$pid" 2>/dev/null || true' INT
trap 'trapped=1; pkill -USR1 -P "$pid" || true' USR1
while :; do
  trapped=0
  if wait "$pid"; then rc=0; else rc=$?; fi
  [ "$trapped" = 1 ] || break  # a trap cut the wait short: torchrun's status is still to come
done
if [ "$rc" -ne 0 ] && [ -s "$errors" ]; then
  head -n 1 "$errors" >&2
elif [ -s "$preempted" ]; then
  head -n 1 "$preempted" >&2
  rc=$EXIT_PREEMPTED
fi
rm -f "$errors" "$preempted"
exit "$rc"
