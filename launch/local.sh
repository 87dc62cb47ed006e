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
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
  -m dist_contrast.cli train --config "$config" "$@"
