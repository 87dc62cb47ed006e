#!/usr/bin/env bash
# The GPU path, checked in one command on a lent GPU machine (one H100/H200, no network, its own
# python3 with torch): at most about 9.5 minutes (the parts' time limits: 170 + 160 + 2 x 100 s).
#   bench/device_check.sh            install the carried wheels (.whl/, from bench/wheels.sh),
#                                    then (a) the tests marked gpu (tests/gpu) on CUDA, (b)
#                                    bench/gpu.sh (ViT-B/16 CLIP bf16 step time and MFU, four
#                                    variants; CLIP loss memory local vs tiled at N = 64k, 128k,
#                                    256k for one rank of W = 8) and (c) `bench train` of the
#                                    ViT-B/16 CLIP config on the digits (the real engine: loader,
#                                    DeepSpeed ZeRO-2 bf16, against the plain DDP loop; its MFU),
#                                    eager then train.compile=true; writes into $OUT (default
#                                    bench/results/device_check): summary.md (the table),
#                                    summary.json, gpu-tests.xml + .log, gpu.json + .md + log,
#                                    train_eager.json / train_compile.json + logs, env.txt.
#                                    Exit status 0 only if every part passed.
#   PARTS="tests bench train"        the parts to run (default all three), e.g. PARTS=train to
#                                    run (c) again on a machine still warm
#   bench/device_check.sh --dry-run  here, without a GPU: the wheel set complete and consistent,
#                                    the commands well formed, the tests run on the CPU
#                                    (DC_GPU_TEST_DEVICE=cpu); one line per check, a one-line
#                                    reason and exit 1 on the first failure.
# With the device tool: bench/wheels.sh here once, then run `bench/device_check.sh` with
# carry [".whl"] and a timeout_s of 600.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TESTS=(tests/gpu -m gpu)                            # the selection, both modes
BENCH_ARGS=(--steps 10 --warmup 3 --budget-s 110)   # bench/gpu.sh's arguments on the device
TEST_S=170                                          # time limits of the parts, seconds
BENCH_S=160
TRAIN_S=100                                         # each of the two bench train runs
PARTS=${PARTS:-tests bench train}
# (c): the ViT-B/16 CLIP config as it is (ZeRO-2, bf16, tiled loss, 8 workers), on the digits
# shards written on the machine (8 px digits read at 224 px), 128 samples per GPU
TRAIN_CONFIG=configs/image_text/clip_vit_b16.yaml
train_overrides() { # $1: the digits folder
  echo "data.train_shards=$1/train-*.tar data.val_shards= data.tokenizer_path=$1/tokenizer.json"
  echo "data.shuffle_buffer=256 train.batch_size=128"
}
TRAIN_FLAGS=(--steps 10 --warmup 3)
# the same command shrunk for the dry run's CPU pass (its form, not its figures)
TRAIN_SMOKE="model.encoder=vit_nano data.image_size=32 text.width=64 text.layers=1 text.heads=4
train.batch_size=4 data.num_workers=1 --steps 1 --warmup 1 --batches 1"
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
if run["train"]:
    fail(f"part (c)'s bench train, shrunk, on the CPU exited {run['train']}")
say("ok: part (c)'s digits, tokenizer and bench train ran on the CPU, shrunk")


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
  trap "rm -rf '$tmp'" EXIT  # expanded now: $tmp is local
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
  say "running the check on the CPU (DC_GPU_TEST_DEVICE=cpu: tests/gpu, bench gpu --smoke, part"
  say "  (c)'s bench train shrunk: vit_nano, 32 px, 4 samples, 1 step), recording every import ..."
  # shellcheck disable=SC2086  # TRAIN_SMOKE's words are arguments
  DC_TRAIN_ARGS="$TRAIN_CONFIG $(train_overrides "$tmp/digits" | tr '\n' ' ') ${TRAIN_FLAGS[*]} $(echo $TRAIN_SMOKE)" \
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
import os  # noqa: E402

digits = tmp / "digits"
train = cli(["shards", "digits", "--out", str(digits)]) or cli(
    ["tokenizer", "train", "--shards", f"{digits}/train-*.tar", "--vocab-size", "512",
     "--out", f"{digits}/tokenizer.json"]
)
train = train or cli(["bench", "train", *os.environ["DC_TRAIN_ARGS"].split(), "--out", str(tmp / "train.json")])
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
            "train": train,
            "importer": importer,
            "files": files,
            "harness": sorted(harness),
        }
    )
)
EOF
    fail "the CPU run of the check broke (see above)"
  analyse "$tmp/run.json"
  # part (c)'s compiled variant: its config loads (the eager one ran above, shrunk)
  # shellcheck disable=SC2046
  "$py" -c "import sys; from dist_contrast.config import load_config as c; c(sys.argv[1], sys.argv[2:])" \
    "$TRAIN_CONFIG" $(train_overrides "$tmp/digits") train.compile=true || fail "$TRAIN_CONFIG with train.compile=true does not load"
  say "ok: the config of part (c) with train.compile=true loads"
  local tree whl
  tree=$(git ls-files -z --others --exclude-standard --cached | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  [ $((tree + whl)) -lt $((60 * 1024 * 1024)) ] ||
    fail "the working tree and .whl/ weigh $(((tree + whl) >> 20)) MiB: over what a call carries"
  say "ok: working tree + .whl/ = $(((tree + whl) >> 20)) MiB (a call carries at most 64 MiB)"
  say "dry run passed: on the GPU machine run bench/device_check.sh (carry .whl, timeout_s 600)"
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

  # a part not in $PARTS is "skipped" (exit status -1 in summary.json)
  local t0 rc_tests=-1 rc_bench=-1 rc_eager=-1 rc_compile=-1 tests_s=0 bench_s=0 train_s=0
  if part tests; then
    t0=$SECONDS
    timeout -k 10 "$TEST_S" "$py" -m pytest "${TESTS[@]}" -q -p no:cacheprovider \
      --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
    rc_tests=${PIPESTATUS[0]}
    tests_s=$((SECONDS - t0))
  fi
  if part bench; then
    t0=$SECONDS
    timeout -k 10 "$BENCH_S" env PYTHON="$py" bench/gpu.sh "${BENCH_ARGS[@]}" \
      --out "$out/gpu.json" 2>&1 | tee "$out/gpu-bench.log"
    rc_bench=${PIPESTATUS[0]}
    bench_s=$((SECONDS - t0))
  fi
  if part train; then
    t0=$SECONDS
    local digits=/tmp/dc-digits variant rc
    rc_eager=1 rc_compile=1
    if "$py" -m dist_contrast.cli shards digits --out "$digits" --force >"$out/train-data.log" 2>&1 &&
      "$py" -m dist_contrast.cli tokenizer train --shards "$digits/train-*.tar" --vocab-size 512 \
        --out "$digits/tokenizer.json" >>"$out/train-data.log" 2>&1; then
      for variant in eager compile; do
        local extra=()
        [ "$variant" = compile ] && extra=(train.compile=true)
        # shellcheck disable=SC2046  # train_overrides's words are the arguments
        timeout -k 10 "$TRAIN_S" "$py" -m torch.distributed.run --nproc_per_node 1 \
          -m dist_contrast.cli bench train "$TRAIN_CONFIG" $(train_overrides "$digits") \
          "${extra[@]}" "${TRAIN_FLAGS[@]}" --out "$out/train_$variant.json" 2>&1 | tee "$out/train_$variant.log"
        rc=${PIPESTATUS[0]}
        if [ "$variant" = eager ]; then rc_eager=$rc; else rc_compile=$rc; fi
      done
    else
      say "the digits shards or their tokenizer failed: $out/train-data.log"
    fi
    train_s=$((SECONDS - t0))
  fi
  "$py" - "$out" "$rc_tests" "$tests_s" "$rc_bench" "$bench_s" "$rc_eager" "$rc_compile" \
    "$train_s" "$((SECONDS - start))" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, rc_tests, tests_s, rc_bench, bench_s, rc_eager, rc_compile, train_s, total_s = sys.argv[1:]
out = Path(out)
tests = {"exit": int(rc_tests), "seconds": int(tests_s)}
try:
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = int(suite.get(key, 0))
except (OSError, ET.ParseError, IndexError):
    tests["note"] = "no junit XML (skipped, or killed at the time limit?)"
bench = {"exit": int(rc_bench), "seconds": int(bench_s)}
if (out / "gpu.json").is_file():
    bench["complete"] = json.loads((out / "gpu.json").read_text()).get("complete")
train = {"exit": {"eager": int(rc_eager), "compile": int(rc_compile)}, "seconds": int(train_s)}
rows, device = [], None
for variant in ("eager", "compile"):
    path = out / f"train_{variant}.json"
    if not path.is_file():
        continue
    r = json.loads(path.read_text())
    e, f, p = r["engine"], r["floor"], r.get("paired", {})
    device = r.get("device")
    train[variant] = {
        "device": device,
        "samples_per_s": {"engine": e["samples_per_s"], "floor": f["samples_per_s"]},
        "ratio": r["ratio"],
        "paired": p,
        "mfu": {"engine": e.get("mfu"), "floor": f.get("mfu")},
    }
    mfu = [f"{100 * x['mfu']:.1f}%" if x.get("mfu") else "n/a" for x in (e, f)]
    interval = f" ({p['low']:.3f}-{p['high']:.3f})" if p else ""
    rows.append(
        f"| {variant} | {e['samples_per_s']:.0f} | {f['samples_per_s']:.0f} "
        f"| {r['ratio']:.3f}{interval} | {mfu[0]} | {mfu[1]} |"
    )
summary = {"tests": tests, "bench": bench, "train": train, "total_seconds": int(total_s)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def ok(rc):
    rc = int(rc)
    if rc < 0:
        return "skipped"
    return "passed" if rc == 0 else "time limit" if rc in (124, 137) else f"exit {rc}"


lines = [
    "| part | result | seconds |",
    "|---|---|---:|",
    f"| tests -m gpu | {ok(rc_tests)}: {tests.get('tests', '?')} tests, "
    f"{tests.get('failures', '?')} failed, {tests.get('errors', '?')} errors, "
    f"{tests.get('skipped', '?')} skipped | {tests_s} |",
    f"| bench gpu | {ok(rc_bench)}, complete: {bench.get('complete')} | {bench_s} |",
    f"| bench train (eager, compile) | {ok(rc_eager)}, {ok(rc_compile)} | {train_s} |",
    "",
]
table = out / "gpu.md"
text = "\n".join(lines) + (table.read_text() if table.is_file() else "(no bench gpu table)\n")
if rows:
    text += (
        f"\nbench train, ViT-B/16 CLIP (ZeRO-2 bf16, 1 GPU x 128, {device}):\n\n"
        "| towers | engine samples/s | DDP floor samples/s | engine / floor (95% interval) "
        "| engine MFU | floor MFU |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
(out / "summary.md").write_text(text)
print(text)
EOF
  say "wrote $out (summary.md, summary.json and each part's files) in $((SECONDS - start)) s"
  local code
  for code in "$rc_tests" "$rc_bench" "$rc_eager" "$rc_compile"; do
    [ "$code" -le 0 ] || return 1
  done
}

part() { # whether part $1 is in $PARTS
  case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

case "${1:-}" in
  --dry-run) dry_run ;;
  "") device_run ;;
  *)
    echo "usage: bench/device_check.sh [--dry-run]" >&2
    exit 2
    ;;
esac
