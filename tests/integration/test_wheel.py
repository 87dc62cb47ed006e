"""A wheel built from the tree, installed into a fresh venv outside the checkout: its
``dist-contrast`` runs a benchmark, writes shards, trains, exports and evaluates with no part of
the source tree; and the package list of pyproject.toml covers the tree.

The fresh venv has no dependencies of its own: a ``.pth`` file names the project venv's
site-packages. A path line of a ``.pth`` only extends ``sys.path``; the ``.pth`` files of the
folder it names are not processed (only ``site.addsitedir`` does that), so the checkout's
editable install (a meta-path finder started by such a file) stays inactive: asserted below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

# What the build reads. The wheel is built from a copy: an in-tree build writes build/ and
# *.egg-info into the checkout, and setuptools packs whatever an earlier build left in build/lib.
SOURCES = ("pyproject.toml", "README.md", "dist_contrast", "bench")
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")  # the project venv's pip
TIMEOUT = 300  # seconds per command; the first DeepSpeed op build alone takes ~30 s on 2 cores

# 2 steps of SimCLR on the digits, batches of 16, a narrow ResNet: paths relative to the cwd.
TINY_RUN = """\
run: {name: tiny, dir: runs}
data: {train_shards: "data/train-*.tar", val_shards: "data/val-*.tar", num_workers: 0}
train: {steps: 2, batch_size: 16, warmup_steps: 1}
checkpoint: {every: 2}
model: {width: 8, proj_hidden_dim: 32, proj_dim: 16}
logging: {wandb: false, progress: false, plots: false}
"""

# Where the fresh venv imports the packages from, and whether an editable finder is active.
PROBE = """\
import json, sys
import dist_contrast, dist_contrast_bench
print(json.dumps({
    "files": [dist_contrast.__file__, dist_contrast_bench.__file__],
    "path": sys.path,
    "editable": [m for m in sys.modules if "editable" in m]
    + [type(f).__name__ for f in sys.meta_path if "Editable" in type(f).__name__],
}))
"""


def test_listed_packages_cover_the_tree():
    """pyproject.toml lists the packages (package-dir cannot rename found ones): every folder
    with Python files under dist_contrast/ and bench/ is listed, and nothing else."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"dist_contrast_bench": "bench"}
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("dist_contrast/**/*.py")}
    for p in ROOT.glob("bench/**/*.py"):
        tree.add(".".join(("dist_contrast_bench", *p.parent.relative_to(ROOT / "bench").parts)))
    listed = set(setuptools["packages"])
    assert tree - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - tree == set(), "listed in pyproject.toml, but not in the tree"


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command to completion (killed after TIMEOUT); fail the test on a non-zero exit."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _env() -> dict[str, str]:
    """The CLI environment, without PYTHONPATH; DeepSpeed's compiled ops cached where the project
    venv keeps them (dist_contrast.distributed puts the cache in the venv, so a fresh venv would
    compile them again, ~30 s)."""
    env = cli_env()
    env.pop("PYTHONPATH", None)
    if os.access(sys.prefix, os.W_OK):
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """The wheel of a copy of the checkout's sources (no network: the venv's setuptools)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheels"
    build = ["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, src]
    _run(*PIP, *build, cwd=tmp_path, env=env)
    (wheel,) = out.glob("dist_contrast-*.whl")
    return wheel


def _fresh_venv(venv_dir: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A venv without pip holding the wheel only, the project's dependencies reachable through a
    ``.pth`` line; its bin folder. The wheel goes in before the ``.pth`` exists, so pip sees no
    installed dist-contrast (the checkout's editable one) to replace."""
    _run(sys.executable, "-m", "venv", "--without-pip", venv_dir, cwd=venv_dir.parent, env=env)
    python = venv_dir / "bin" / "python"
    install = ["--python", python, "install", "-q", "--no-deps", "--no-index", wheel]
    _run(*PIP, *install, cwd=venv_dir.parent, env=env)
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(python, "-c", code, cwd=venv_dir.parent, env=env).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (site / "_project_deps.pth").write_text("".join(f"{path}\n" for path in deps))
    return venv_dir / "bin"


@pytest.mark.slow
def test_wheel_runs_outside_the_checkout(tmp_path):
    assert not tmp_path.is_relative_to(ROOT), "needs a tmp_path outside the checkout"
    env = _env()
    wheel = _build_wheel(tmp_path, env)
    venv_dir, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    bin_dir = _fresh_venv(venv_dir, wheel, env)

    probe = json.loads(_run(bin_dir / "python", "-c", PROBE, cwd=work, env=env).stdout)
    for file in map(Path, probe["files"]):
        assert file.is_relative_to(venv_dir) and not file.is_relative_to(ROOT), file
    assert probe["editable"] == []
    assert str(ROOT) not in probe["path"] and str(ROOT / "bench") not in probe["path"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return _run(bin_dir / "dist-contrast", *args, cwd=work, env=env)

    # the smallest benchmark, its result at the default place under the cwd
    assert "wrote bench/results/losses.json" in cli("bench", "losses", "--quick").stdout
    result = json.loads((work / "bench" / "results" / "losses.json").read_text())
    assert {r["B"] for r in result["results"]} == {16, 32}

    # a tiny run trained, exported and evaluated by the wheel
    cli("shards", "digits", "--out", "data", "--shard-size", "200")
    (work / "tiny.yaml").write_text(TINY_RUN)
    assert "run finished: runs/tiny" in cli("train", "--config", "tiny.yaml").stdout
    assert "exported step_00000002" in cli("export", "--run", "runs/tiny", "--out", "out").stdout
    export = json.loads((work / "out" / "export.json").read_text())
    assert export["checkpoint"] == "step_00000002"
    assert (work / "out" / "image" / "model.safetensors").is_file()
    assert "kNN top-1" in cli("eval", "--run", "runs/tiny", "--brief").stdout
    evaluated = json.loads((work / "runs" / "tiny" / "eval.json").read_text())
    assert evaluated["checkpoint"] == "step_00000002" and 0.0 <= evaluated["knn_top1"] <= 1.0
