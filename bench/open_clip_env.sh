#!/usr/bin/env bash
# A separate virtual environment for open_clip_train (open-clip-torch 3.3.0), the trainer that
# `dist-contrast bench vs_open_clip` runs beside ours, and clip-benchmark 1.6.2; the open_clip
# tests (marked open_clip: exports loaded by open_clip and CLIP_benchmark) run in it.
# The project's own environment is not touched.
#   bench/open_clip_env.sh [VENV]      (default .venv-open-clip, ignored by git; make open-clip-env)
# Order matters: torch==$TORCH_VERSION first (here that spec takes the local CPU wheel; pip then
# leaves it alone, where any other torch spec would pull gigabytes of CUDA packages), then
# torchvision with --no-deps (its wheel pins the CUDA torch), then open-clip-torch[training]
# (which ships both `open_clip` and `open_clip_train`; the extra brings webdataset, pandas,
# transformers, ...): torch and torchvision already satisfy its requirements.
# torchvision's wheel does not import beside a CPU torch (its operator library needs CUDA's);
# bench/open_clip_fix.py, copied into this environment only, works around it (read why there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-open-clip}
PY3=${PY3:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}
OPEN_CLIP_VERSION=${OPEN_CLIP_VERSION:-3.3.0}
CLIP_BENCHMARK_VERSION=${CLIP_BENCHMARK_VERSION:-1.6.2}

test -x "$VENV/bin/python" || "$PY3" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q --no-deps "torchvision==$TORCHVISION_VERSION"
"$PY" -m pip install -q "open-clip-torch[training]==$OPEN_CLIP_VERSION" "torch==$TORCH_VERSION" \
  "torchvision==$TORCHVISION_VERSION"
# CLIP_benchmark, the zero-shot/retrieval suite that evaluates open_clip models (the tests run
# its `clip_benchmark eval` on our open_clip export); it imports requests without requiring
# it, and its accuracy does float() of a 1-element array, an error from NumPy 2.4 on
"$PY" -m pip install -q "clip-benchmark==$CLIP_BENCHMARK_VERSION" requests "numpy<2.4" \
  "open-clip-torch==$OPEN_CLIP_VERSION" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp bench/open_clip_fix.py "$SITE/_dc_open_clip_fix.py"
echo "import _dc_open_clip_fix; _dc_open_clip_fix.install()" > "$SITE/_dc_open_clip_fix.pth"
OMP_NUM_THREADS=1 "$PY" -c "import torchvision, open_clip, open_clip_train.main, clip_benchmark.cli, sys; \
print(f'open_clip {open_clip.__version__}, torch {sys.modules[\"torch\"].__version__}, \
torchvision {torchvision.__version__}: $VENV')"
touch "$VENV/.setup-done"
