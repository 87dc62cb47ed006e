"""Shared fixtures: digits shards written once per session, CLI runners."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# open_clip's own environment (marker open_clip): the one `make open-clip-env` finished (it
# writes .setup-done last), or one named by OPEN_CLIP_PYTHON
OPEN_CLIP_PYTHON = Path(
    os.environ.get("OPEN_CLIP_PYTHON", ROOT / ".venv-open-clip" / "bin" / "python")
)
OPEN_CLIP_READY = OPEN_CLIP_PYTHON.exists() and (
    "OPEN_CLIP_PYTHON" in os.environ or (OPEN_CLIP_PYTHON.parents[1] / ".setup-done").exists()
)
needs_open_clip = pytest.mark.skipif(
    not OPEN_CLIP_READY,
    reason=f"no open_clip environment at {OPEN_CLIP_PYTHON} (make open-clip-env)",
)


def run_open_clip(*args: str, program: str = "python", timeout: float = 600) -> str:
    """``program`` (its python, or a script of its ``bin/``) of open_clip's environment with
    ``args``, one thread, nothing of this environment inherited; its stdout, once it exited 0."""
    proc = subprocess.run(
        [str(OPEN_CLIP_PYTHON.parent / program), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def pytest_collection_modifyitems(config, items):
    """``ranks32`` tests are opt-in: skipped unless the -m expression names the marker."""
    if "ranks32" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="32 local ranks: opt-in, run with -m ranks32")
    for item in items:
        if "ranks32" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The built-in digits as shards of 100 samples (15 train, 4 val shards)."""
    from dist_contrast.data.write.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, shard_size=100)
    return out


@pytest.fixture(scope="session")
def digits_tokenizer(digits_dir, tmp_path_factory) -> Path:
    """A BPE tokenizer.json learnt from the digits captions, as `make train` writes it."""
    from dist_contrast.data.tokenizer import train_bpe_from_shards

    tok, _ = train_bpe_from_shards(str(digits_dir / "train-*.tar"), vocab_size=512)
    path = tmp_path_factory.mktemp("digits_tokenizer") / "tokenizer.json"
    tok.save(path)
    return path


def config_from_dict(tree: dict):
    """A validated config from a (partial) nested dict, as a YAML file would give it."""
    from dist_contrast.config import Config
    from dist_contrast.config.parse import build
    from dist_contrast.config.validate import validate

    cfg = build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def eight_step_digits_run(run_dir: Path, digits_dir: Path) -> dict[str, object]:
    """Overrides of an 8-step digits run with a checkpoint at step 4 and no validation, wandb
    or progress bars: the resume tests' run."""
    return {
        "run.dir": str(run_dir),
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": "",
        "train.batch_size": 32,
        "train.steps": 8,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "checkpoint.every": 4,
        "logging.wandb": "false",
        "logging.progress": "false",
    }


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_group(cmd: list[str], cwd: Path | None, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own; past ``timeout`` every process of it (torchrun's workers
    too, not only torchrun) is killed before ``TimeoutExpired`` is raised: a hung test leaves
    nothing running."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``dist-contrast ARGS`` as a user runs it, one process."""
    return run_group([sys.executable, "-m", "dist_contrast.cli", *args], cwd, timeout)


def run_torchrun(
    nproc: int, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC -m dist_contrast.cli ARGS``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "dist_contrast.cli",
        *args,
    ]
    return run_group(cmd, cwd, timeout)


def closed_form_lr(step, lr, warmup, total, floor):
    """The LR after ``step`` scheduler steps as warmup_cosine documents it ("linear warmup to 1,
    then cosine down to min_lr_ratio"), written out here: ``lr * (step + 1) / warmup`` during
    the warm-up (``lr / warmup`` at step 0, the peak at its last step), then a half cosine from
    the peak at ``warmup`` to ``lr * floor`` at ``total``, where it stays."""
    if step < warmup:
        return lr * (step + 1) / warmup
    assert total > warmup, "no cosine phase: only the warm-up steps have a documented LR"
    done = (min(step, total) - warmup) / (total - warmup)
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * done)) / 2)


def finite_number(x) -> bool:
    """A real number that is neither NaN nor infinite (not None, a string or a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
