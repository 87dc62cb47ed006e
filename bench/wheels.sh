#!/usr/bin/env bash
# The wheels bench/device_check.sh carries to a GPU machine that has no network: the
# distributions the check imports that the machine's python3 (3.12, x86-64, torch 2.11 with
# CUDA) lacks, and what they need. Each is pinned to the version installed in this checkout's
# environment (the one `make test` and `device_check.sh --dry-run` ran), one version of each.
# They go to .whl/ (ignored by git; named in the device tool's `carry`).
#   bench/wheels.sh            fetch them (pip download; deepspeed, which PyPI has only as an
#                              sdist, is built here: a pure-Python wheel, its ops compiled on
#                              the GPU machine when first used)
#   bench/wheels.sh --list     print NAME==VERSION of each, fetching nothing
# PYTHON selects the environment the versions come from (default .venv/bin/python).
# Not carried: wandb (the check does not import it; its wheel and dependencies would be most of
# the 64 MiB a call may carry), nor what the GPU machine has (its list: device_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEEL_DIR=.whl

# deepspeed needs hjson and pydantic (-> pydantic-core, annotated-types, typing-inspection,
# typing-extensions >= 4.16: carried, the GPU machine's may be older); webdataset needs
# braceexpand; kornia needs kornia-rs.
WHEELS=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
  typing-extensions webdataset braceexpand kornia kornia-rs)
SDIST_ONLY=(deepspeed)

pins() {
  "$PYTHON" - "${WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"bench/wheels.sh: not installed in {sys.executable}: {', '.join(missing)} (make setup)")
EOF
}

if [ "${1:-}" = "--list" ]; then
  pins
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: bench/wheels.sh [--list]" >&2; exit 2; }

if ! git check-ignore -q "$WHEEL_DIR/x.whl" 2>/dev/null; then
  echo "bench/wheels.sh: $WHEEL_DIR/ is not ignored by git; add /$WHEEL_DIR/ to .gitignore" >&2
  exit 1
fi
mapfile -t PINS < <(pins)
mkdir -p "$WHEEL_DIR"
# the platform of the GPU machine's python3 (the device tool's README): CPython 3.12, manylinux
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=()
BUILT=()
for pin in "${PINS[@]}"; do
  if [[ " ${SDIST_ONLY[*]} " == *" ${pin%%==*} "* ]]; then BUILT+=("$pin"); else BINARY+=("$pin"); fi
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$WHEEL_DIR" "${BINARY[@]}"
for pin in "${BUILT[@]}"; do
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w "$WHEEL_DIR" "$pin"
done

# one version of each: remove wheels of these names at other versions, and of other names
"$PYTHON" - "$WHEEL_DIR" "${PINS[@]}" <<'EOF'
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

folder, pins = Path(sys.argv[1]), dict(p.split("==") for p in sys.argv[2:])
want = {canonicalize_name(k): v for k, v in pins.items()}
for path in sorted(folder.glob("*.whl")):
    name, ver, _, _ = parse_wheel_filename(path.name)
    if want.get(name) != str(ver):
        print(f"bench/wheels.sh: removed {path.name} (not in the pinned set)")
        path.unlink()
EOF
ls -l "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
