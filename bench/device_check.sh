#!/usr/bin/env bash
# The GPU path, checked in one command on a lent GPU machine (one H100/H200, no network, its own
# python3 with torch): at most about 8 minutes.
#   bench/device_check.sh            install the carried wheels (.whl/, from bench/wheels.sh),
#                                    then (a) the tests marked gpu (tests/gpu) on CUDA and (b)
#                                    bench/gpu.sh (ViT-B/16 CLIP bf16 step time and MFU, four
#                                    variants; CLIP loss memory local vs tiled at N = 64k, 128k,
#                                    256k for one rank of W = 8); writes into $OUT (default
#                                    bench/results/device_check): summary.md (the table),
#                                    summary.json, gpu-tests.xml + .log, gpu.json + .md + log,
#                                    env.txt. Exit status 0 only if every part passed.
#   bench/device_check.sh --dry-run  here, without a GPU: the wheel set complete and consistent,
#                                    the commands well formed, the tests run on the CPU
#                                    (DC_GPU_TEST_DEVICE=cpu); one line per check, a one-line
#                                    reason and exit 1 on the first failure.
# With the device tool: bench/wheels.sh here once, then run `bench/device_check.sh` with
# carry [".whl"] and a timeout_s of 540.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TESTS=(tests/gpu -m gpu)                            # the selection, both modes
BENCH_ARGS=(--steps 10 --warmup 3 --budget-s 140)   # bench/gpu.sh's arguments on the device
TEST_S=210                                          # time limits of the parts, seconds
BENCH_S=230
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
# The GPU machine's python3 packages (the device tool's KINDS.md, 2026-11-17), with the versions
# it lists where it lists one. Anything else the check imports travels as a wheel.
DEVICE_VERSIONS="accelerate==1.15.0 numpy==2.5.2 onnx==1.23.1 onnxruntime==1.30.0
safetensors==0.8.0 tokenizers==0.23.2 torch==2.11.0 torchvision==0.26.0 transformers==5.17.0
triton==3.6.0 huggingface-hub==1.33.0 jax==0.11.2 cupy-cuda13x==14.2.0 torchmetrics==1.9.0"
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc
anyio attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama
contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler
cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

say() { echo "device_check: $*"; }
fail() {
  echo "device_check: FAIL: $*" >&2
  exit 1
}

# --------------------------------------------------------------------------------------------
# --dry-run: everything checkable without the GPU machine

# analyse MODE: "wheels" (the wheel set alone) or the run.json of the CPU run (everything)
analyse() {
  "$py" - "$1" "$pins" "$DEVICE_PACKAGES" "$DEVICE_VERSIONS" <<'EOF' || exit 1
import json, sys, sysconfig
from pathlib import Path
from zipfile import ZipFile

import tomllib
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name as canon
from packaging.utils import parse_wheel_filename


def fail(msg):
    sys.exit(f"device_check: FAIL: {msg}")


def say(msg):
    print(f"device_check: {msg}", flush=True)


mode, pins = sys.argv[1], dict(p.split("==") for p in sys.argv[2].split())
pins = {canon(k): v for k, v in pins.items()}
device = {canon(n) for n in sys.argv[3].split()}
device_versions = {canon(p.split("==")[0]): p.split("==")[1] for p in sys.argv[4].split()}

# the wheels: one per pinned name, at the pinned version, installable on the device
platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
tags = {*cpython_tags((3, 12), platforms=platforms)}
tags |= {*compatible_tags((3, 12), "cp312", platforms=platforms)}
wheels = {}
for path in sorted(Path(".whl").glob("*.whl")):
    name, version, _, wtags = parse_wheel_filename(path.name)
    if name in wheels:
        fail(f".whl/ holds two versions of {name}: one stops the whole install (bench/wheels.sh)")
    if not wtags & tags:
        fail(f"{path.name} does not install on CPython 3.12 manylinux x86-64")
    wheels[name] = (str(version), path)
if set(wheels) != set(pins):
    fail(f".whl/ is not the pinned set: missing {sorted(set(pins) - set(wheels))}, extra "
         f"{sorted(set(wheels) - set(pins))} (bench/wheels.sh)")
for name, (version, _) in wheels.items():
    if version != pins[name]:
        fail(f".whl/ has {name} {version}, this environment {pins[name]} (bench/wheels.sh)")
if mode == "wheels":
    say(f"ok: .whl/ holds the {len(wheels)} wheels of bench/wheels.sh, one version each, the "
        "versions installed here, each for CPython 3.12 manylinux x86-64")
    sys.exit(0)
run = json.loads(Path(mode).read_text())
c = run["counts"]
if run["pytest"] != 0 or c.get("failed") or c.get("error"):
    fail(f"tests/gpu on the CPU: {c} {run['failed'][:3]}")
if not run["collected"] or run["collected"] != run["in_folder"]:
    fail(f"-m gpu selects {run['collected']} of the {run['in_folder']} tests in tests/gpu")
say(f"ok: -m gpu collects all {run['collected']} tests of tests/gpu; on the CPU: {c}")
if run["bench"] != 0:
    fail(f"bench gpu --device cpu --smoke exited {run['bench']}")
say("ok: bench gpu --device cpu --smoke ran (every variant, the loss memory)")


# every distribution imported by this project's code (and the tests), or by a carried wheel, is
# on the device or carried; what a device package imports is the device's own business
from importlib.metadata import distributions

root, stdlib_dir = Path.cwd().resolve(), Path(sysconfig.get_paths()["stdlib"]).resolve()
owner_of = {}
for dist in distributions():
    for f in dist.files or []:
        owner_of[str(Path(dist.locate_file(f)).resolve())] = canon(dist.metadata["Name"])


def owner(module: str) -> str | None:
    """The distribution of a top-level module; "ours" (this checkout), "stdlib", or None."""
    file = run["files"].get(module)
    if file is None:
        return "stdlib" if module in sys.stdlib_module_names or module in sys.builtin_module_names else None
    path = Path(file).resolve()
    dist = owner_of.get(str(path))
    if dist == "dist-contrast" or dist is None and path.is_relative_to(root):
        return "ours"
    return dist or ("stdlib" if path.is_relative_to(stdlib_dir) else None)


needed, seen_from = set(), {}
for module, who in run["importer"].items():
    by = "ours" if who in ("conftest",) else owner(who)
    if by != "ours" and by not in wheels:
        continue
    dist = owner(module)
    if dist not in (None, "ours", "stdlib"):
        needed.add(dist)
        seen_from.setdefault(dist, f"{module} (imported by {who})")
missing = sorted(d for d in needed if d not in device and d not in wheels)
if missing:
    fail("imported by the check, neither on the device nor in .whl/: "
         + ", ".join(seen_from[d] for d in missing) + " (add to WHEELS in bench/wheels.sh)")
carried = sorted(d for d in needed if d in wheels)
say(f"ok: the check's code and the carried wheels import {len(needed)} distributions; "
    f"carried: {', '.join(carried)}; the others are on the device")

# what the carried wheels need: on the device or carried, at versions that fit
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
unknown = set()


def check(req: Requirement, who: str) -> None:
    if req.marker is not None and not req.marker.evaluate(env):
        return
    name = canon(req.name)
    have = wheels[name][0] if name in wheels else device_versions.get(name)
    if name not in wheels and name not in device:
        fail(f"{who} needs {req}: neither on the device nor in .whl/")
    if have is None:
        if req.specifier:
            unknown.add(f"{req} (for {who})")
    elif not req.specifier.contains(have, prereleases=True):
        fail(f"{who} needs {req}, the device would have {name} {have}")


for name, (_, path) in wheels.items():
    with ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            check(Requirement(line.split(":", 1)[1].strip()), name)
say("ok: every requirement of the carried wheels is carried or on the device, versions fitting")

# pyproject's dependencies (and the test extra) against what the device would have
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
skipped = []
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(spec)
    name = canon(req.name)
    if name not in needed and name not in wheels:
        skipped.append(name)
        continue
    check(req, "pyproject.toml")
say(f"ok: pyproject.toml's requirements fit what the device would have (not imported by the "
    f"check, not carried: {', '.join(sorted(skipped))})")
if unknown:
    say("note: versions not known here (KINDS.md lists no version): " + "; ".join(sorted(unknown)))
EOF
}


dry_run() {
  local py=${PYTHON:-.venv/bin/python} tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for f in bench/device_check.sh bench/gpu.sh bench/wheels.sh; do
    bash -n "$f" || fail "$f: bash syntax error"
  done
  say "ok: bench/device_check.sh, bench/gpu.sh, bench/wheels.sh parse (bash -n)"
  grep -q "bench/device_check.sh" README.md || fail "README.md does not name bench/device_check.sh"
  say "ok: README.md names bench/device_check.sh"
  [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null || fail "no wheels in .whl/: run bench/wheels.sh"
  git check-ignore -q .whl/x.whl || fail ".whl/ is not ignored by git (add /.whl/ to .gitignore)"
  local pins
  pins=$(PYTHON=$py bash bench/wheels.sh --list) || fail "bench/wheels.sh --list failed"
  analyse wheels
  # the install command of the device, for its platform (CPython 3.12, manylinux x86-64)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$tmp/site" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 .whl/*.whl >"$tmp/pip.log" 2>&1 ||
    fail "the wheels do not install for CPython 3.12 on x86-64: $(grep -m1 ERROR "$tmp/pip.log")"
  say "ok: .whl/ installs for CPython 3.12 manylinux x86-64 ($(du -sh .whl | cut -f1), ignored by git)"
  "$py" -c "from dist_contrast_bench.gpu import _parse; import sys; _parse(sys.argv[1:])" \
    "${BENCH_ARGS[@]}" --out "$tmp/gpu.json" || fail "bench gpu rejects its arguments: ${BENCH_ARGS[*]}"
  say "ok: bench gpu accepts ${BENCH_ARGS[*]} --out \$OUT/gpu.json"
  say "running the check on the CPU (DC_GPU_TEST_DEVICE=cpu: tests/gpu, then bench gpu --smoke),"
  say "  recording every module it imports ..."
  DC_GPU_TEST_DEVICE=cpu DS_ACCELERATOR=cpu "$py" - "$tmp" "${TESTS[@]}" <<'EOF' ||
import json, sys
from pathlib import Path

tmp, selection = Path(sys.argv[1]), sys.argv[2:]
harness = {m.split(".")[0] for m in sys.modules}
importer = {}  # top-level module -> the top-level module whose code imported it first


class Recorder:
    """A finder that finds nothing: it notes who imports each new top-level module."""

    def find_spec(self, name, path=None, target=None):
        if "." in name or name in importer:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(
            ("importlib", "_frozen_importlib", "pkgutil", "__main__")
        ):
            frame = frame.f_back
        who = frame.f_globals.get("__name__", "?") if frame is not None else "?"
        importer[name] = who.split(".")[0]
        return None


sys.meta_path.insert(0, Recorder())
import pytest  # noqa: E402


class Outcomes:
    def __init__(self):
        self.counts, self.collected, self.failed = {}, 0, []

    def pytest_collection_finish(self, session):
        self.collected = len(session.items)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1
            if report.outcome == "failed":
                self.failed.append(report.nodeid)


everything = Outcomes()
pytest.main([*selection[:1], "--collect-only", "-q", "-p", "no:cacheprovider"], [everything])
outcomes = Outcomes()
code = pytest.main([*selection, "-q", "-p", "no:cacheprovider", "-o", "addopts="], [outcomes])
from dist_contrast.cli import main as cli

bench = cli(["bench", "gpu", "--device", "cpu", "--smoke", "--out", str(tmp / "gpu.json")])
files = {}
for name, module in list(sys.modules.items()):
    if "." not in name and getattr(module, "__file__", None):
        files[name] = module.__file__
(tmp / "run.json").write_text(
    json.dumps(
        {
            "pytest": int(code),
            "in_folder": everything.collected,
            "collected": outcomes.collected,
            "counts": outcomes.counts,
            "failed": outcomes.failed,
            "bench": bench,
            "importer": importer,
            "files": files,
            "harness": sorted(harness),
        }
    )
)
EOF
    fail "the CPU run of the check broke (see above)"
  analyse "$tmp/run.json"
  local tree whl
  tree=$(git ls-files -z --others --exclude-standard --cached | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  [ $((tree + whl)) -lt $((60 * 1024 * 1024)) ] ||
    fail "the working tree and .whl/ weigh $(((tree + whl) >> 20)) MiB: over what a call carries"
  say "ok: working tree + .whl/ = $(((tree + whl) >> 20)) MiB (a call carries at most 64 MiB)"
  say "dry run passed: on the GPU machine run bench/device_check.sh (carry .whl, timeout_s 540)"
}

# --------------------------------------------------------------------------------------------
# the check, on the GPU machine

device_run() {
  local py=${PYTHON:-python3} out=${OUT:-bench/results/device_check} start=$SECONDS
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  export PYTHONUNBUFFERED=1
  compgen -G ".whl/*.whl" >/dev/null || fail "no wheels in .whl/: run bench/wheels.sh here, carry .whl"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || fail "the carried wheels did not install into $SITE"
  ln -sfn "$ROOT/bench" "$SITE/dist_contrast_bench"  # the package-dir of pyproject.toml
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c 'import deepspeed, kornia, webdataset, dist_contrast, dist_contrast_bench' ||
    fail "the check's imports fail with PYTHONPATH=$PYTHONPATH"
  "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' ||
    fail "$py sees no CUDA device"
  {
    nvidia-smi 2>&1 | head -20
    "$py" -c 'import torch, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda,
"deepspeed", deepspeed.__version__, torch.cuda.get_device_name(0))'
  } >"$out/env.txt" 2>&1
  say "$(tail -1 "$out/env.txt"); wheels installed in $((SECONDS - start)) s"

  local t0=$SECONDS rc_tests rc_bench
  timeout -k 10 "$TEST_S" "$py" -m pytest "${TESTS[@]}" -q -p no:cacheprovider \
    --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
  rc_tests=${PIPESTATUS[0]}
  local tests_s=$((SECONDS - t0))
  t0=$SECONDS
  timeout -k 10 "$BENCH_S" env PYTHON="$py" bench/gpu.sh "${BENCH_ARGS[@]}" \
    --out "$out/gpu.json" 2>&1 | tee "$out/gpu-bench.log"
  rc_bench=${PIPESTATUS[0]}
  local bench_s=$((SECONDS - t0))
  "$py" - "$out" "$rc_tests" "$tests_s" "$rc_bench" "$bench_s" "$((SECONDS - start))" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, rc_tests, tests_s, rc_bench, bench_s, total_s = sys.argv[1:]
out = Path(out)
tests = {"exit": int(rc_tests), "seconds": int(tests_s)}
try:
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = int(suite.get(key, 0))
except (OSError, ET.ParseError, IndexError):
    tests["note"] = "no junit XML (killed at the time limit?)"
bench = {"exit": int(rc_bench), "seconds": int(bench_s)}
if (out / "gpu.json").is_file():
    bench["complete"] = json.loads((out / "gpu.json").read_text()).get("complete")
summary = {"tests": tests, "bench": bench, "total_seconds": int(total_s)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
ok = lambda rc: "passed" if rc == 0 else ("time limit" if rc in (124, 137) else f"exit {rc}")
lines = [
    "| part | result | seconds |",
    "|---|---|---:|",
    f"| tests -m gpu | {ok(tests['exit'])}: {tests.get('tests', '?')} tests, "
    f"{tests.get('failures', '?')} failed, {tests.get('errors', '?')} errors, "
    f"{tests.get('skipped', '?')} skipped | {tests_s} |",
    f"| bench gpu | {ok(bench['exit'])}, complete: {bench.get('complete')} | {bench_s} |",
    "",
]
table = out / "gpu.md"
text = "\n".join(lines) + (table.read_text() if table.is_file() else "(no bench table)\n")
(out / "summary.md").write_text(text)
print(text)
EOF
  say "wrote $out (summary.md, summary.json, gpu-tests.xml, gpu.json) in $((SECONDS - start)) s"
  [ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
}

case "${1:-}" in
  --dry-run) dry_run ;;
  "") device_run ;;
  *)
    echo "usage: bench/device_check.sh [--dry-run]" >&2
    exit 2
    ;;
esac
