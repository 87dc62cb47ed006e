#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a CUDA machine: CLIP ViT-B/16 step time and MFU in bf16 at
# the largest micro-batch that fits, and the CLIP loss memory, local vs tiled, at global batches
# of 64k, 128k and 256k. Writes bench/results/gpu.json (device name inside).
#   bench/gpu.sh [extra arguments of `dist-contrast bench gpu`]
# PYTHON selects the interpreter (default: .venv/bin/python if it has CUDA, else python3); it
# needs a CUDA build of torch; this package (with its benchmarks, dist_contrast_bench) is installed
# into it (editable) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
if ! "$PYTHON" -c 'import torch,sys; sys.exit(not torch.cuda.is_available())'; then
  echo "bench/gpu.sh: $PYTHON has no CUDA device (torch.cuda.is_available() is false)" >&2
  exit 2
fi
"$PYTHON" -c 'import dist_contrast, dist_contrast_bench' 2>/dev/null ||
  "$PYTHON" -m pip install -q --no-deps -e .
"$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'
exec "$PYTHON" -m dist_contrast.cli bench gpu "$@"
