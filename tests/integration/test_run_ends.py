"""Every run ends: a job whose rank raises, or which simply finishes, leaves no
process behind, and ends promptly. Real torchrun, DeepSpeed, loader workers; the fault is
planted by tests/integration/planted.py.

The loader's workers hold stop signals blocked, so a rank that left by an exception used to
hang at interpreter exit joining them (multiprocessing's SIGTERM does not reach them), and its
peers waited in a collective for the 600 s timeout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import cli_env

pytestmark = pytest.mark.slow  # launches real training processes: make test-slow, CI

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def _tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag``: torchrun, its ranks (torchrun starts
    them in sessions of their own) and their loader workers, however they were reparented."""
    needle = f"DIST_CONTRAST_TEST_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_tagged(tag: str) -> None:
    for pid in _tagged_pids(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def started(cmd: list[str], env: dict[str, str] | None = None, new_session: bool = False):
    """``cmd`` with its processes tagged (its environment names the tag); yields (process,
    tag). Whatever happens in the block, no process it started survives it."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd,
        env={**(env or cli_env()), "DIST_CONTRAST_TEST_TAG": tag},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=new_session,
    )
    try:
        yield proc, tag
    finally:
        _kill_tagged(tag)
        proc.kill()
        proc.communicate()


def _torchrun(args: list[str], env: dict[str, str] | None = None):
    """torchrun with 2 ranks, tagged (:func:`started`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return started(cmd + args, env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` exists (the job has got that far), the job ends, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, tag: str, timeout: float) -> tuple[str, float, list[int]]:
    """Wait for the job to end: (stderr, seconds it took from now, pids still alive then)."""
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not end within {timeout} s; processes {_tagged_pids(tag)}")
    elapsed = time.monotonic() - start
    time.sleep(1.0)  # let a process that is already leaving finish
    return err, elapsed, _tagged_pids(tag)


def _launch(args: list[str], env: dict[str, str], timeout: float):
    """torchrun to the end: (returncode, stderr, seconds, pids left after it ended)."""
    with _torchrun(args, env) as (proc, tag):
        err, elapsed, left = _finish(proc, tag, timeout)
        return proc.returncode, err, elapsed, left


def _args(digits_dir: Path, run_dir: Path, name: str, workers: int, steps: int) -> list[str]:
    return [
        "--config",
        "configs/simclr_digits.yaml",
        f"run.dir={run_dir}",
        f"run.name={name}",
        f"data.train_shards={digits_dir}/train-*.tar",
        f"data.val_shards={digits_dir}/val-*.tar",
        f"data.num_workers={workers}",
        "model.width=4",
        "train.batch_size=16",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        "train.log_every=1",
        f"checkpoint.every={steps}",
        "logging.wandb=false",
        "logging.plots=false",
        "logging.progress=false",
    ]


def test_an_exception_on_one_rank_ends_the_whole_job(digits_dir, tmp_path):
    env = {**cli_env(), "PLANT": "raise:1:3"}
    args = [str(HERE / "planted.py"), "train", *_args(digits_dir, tmp_path, "boom", 2, 20)]
    code, err, elapsed, left = _launch(args, env, timeout=120)
    assert code != 0
    assert "planted fault on rank 1 at step 3" in err
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after the fault\n{err[-3000:]}"
    assert left == [], f"processes left behind: {left}"
    # the peer's own failure is secondary: one line, no traceback of its collective
    peer = [line for line in err.splitlines() if "[rank 0]" in line]
    assert len(peer) <= 1, err[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_short_runs_end_promptly(digits_dir, tmp_path, workers):
    """Runs that finish end within 15 s of their last step (the stress form: 20 in a row,
    DIST_CONTRAST_RUNS=20)."""
    runs = int(os.environ.get("DIST_CONTRAST_RUNS", "2"))
    for i in range(runs):
        name = f"short{workers}-{i}"
        args = ["-m", "dist_contrast.cli", "train", *_args(digits_dir, tmp_path, name, workers, 3)]
        code, err, _, left = _launch(args, cli_env(), timeout=180)
        ended = time.time()
        assert code == 0, err[-3000:]
        assert left == [], f"run {i}: processes left behind: {left}"
        last_step = (tmp_path / name / "metrics.jsonl").stat().st_mtime
        late = ended - last_step
        assert late < 15, f"run {i} ended {late:.0f} s after its last step"


def _mount(tmp_path, options):
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return mount


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MiB tmpfs at tmp_path/fs, unmounted afterwards (mounting needs root, as in CI)."""
    mount = _mount(tmp_path, "size=64m")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_check_refuses_a_run_dir_that_cannot_be_written(digits_dir, tmp_path):
    """A read-only file system (root writes through permissions, not through that)."""
    mount = _mount(tmp_path, "size=1m,ro")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dist_contrast.cli", "train"]
            + _args(digits_dir, mount / "runs", "ro", 1, 3)
            + ["--check"],
            env=cli_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot be written: Read-only file system" in lines[0]


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` until ``leave`` bytes are free."""
    with open(folder / "filler", "wb") as f:
        while (free := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize) > leave:
            f.write(b"\0" * min(free - leave, 1 << 20))
            f.flush()


def test_a_full_disk_at_a_checkpoint_ends_every_rank(digits_dir, tmpfs):
    """A checkpoint is written (every 3 steps); then the disk fills (64 KiB left, enough for
    metrics.jsonl, not for a checkpoint): the next one fails on the ranks, and the whole job
    ends with one line naming the folder and the free space, `latest` where it was."""
    args = ["-m", "dist_contrast.cli", "train", *_args(digits_dir, tmpfs, "full", 1, 40)]
    args += ["checkpoint.every=3"]
    with _torchrun(args) as (proc, tag):
        latest = tmpfs / "full" / "checkpoints" / "latest"
        _wait_for(latest, proc)
        assert latest.exists(), "the first checkpoint never came"
        _fill(tmpfs, 64 << 10)
        kept = latest.read_text().strip()  # a checkpoint that raced the filling may be newer
        err, elapsed, left = _finish(proc, tag, 90)
    assert proc.returncode != 0
    assert elapsed < 60, f"{elapsed:.0f} s\n{err[-3000:]}"
    assert left == [], f"processes left behind: {left}"
    ours = [line for line in err.splitlines() if line.startswith("dist-contrast:")]
    assert any("could not write checkpoint" in line and "MiB free" in line for line in ours), err
    assert "dist_contrast/" not in err, err[-3000:]  # no traceback through the ranks' code
    assert latest.read_text().strip() == kept
    assert not list((tmpfs / "full" / "checkpoints").glob(".tmp_*"))


def test_a_diverging_run_ends_every_rank_with_one_line(digits_dir, tmp_path):
    """train.lr=1e30: the guard's DivergedError on every rank (it used to be a ValueError of
    the losses' NaN check on one rank, then a hang)."""
    args = ["-m", "dist_contrast.cli", "train", *_args(digits_dir, tmp_path, "lr", 1, 40)]
    code, err, elapsed, left = _launch(args + ["train.lr=1e30"], cli_env(), timeout=120)
    assert code != 0
    assert elapsed < 60 and left == []
    ours = [line for line in err.splitlines() if line.startswith("dist-contrast:")]
    assert ours and all("steps in a row had a non-finite loss" in line for line in ours), err


def test_a_second_run_on_the_same_run_dir_is_refused(digits_dir, tmp_path):
    """While a run owns its folder a second one is refused in one line; the first finishes
    untouched, each step once in metrics.jsonl."""
    first = ["-m", "dist_contrast.cli", "train", *_args(digits_dir, tmp_path, "own", 1, 300)]
    with _torchrun(first) as (proc, tag):
        metrics = tmp_path / "own" / "metrics.jsonl"
        _wait_for(metrics, proc)
        assert metrics.exists(), "the first run never started"
        second = subprocess.run(
            [sys.executable, "-m", "dist_contrast.cli", "train"]
            + _args(digits_dir, tmp_path, "own", 1, 300)
            + ["checkpoint.resume=latest"],
            env=cli_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        second_started = time.time()  # after its checks: it has been refused by then
        err, _, _ = _finish(proc, tag, 180)
        first_ended = time.time()
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is in use by another run (pid " in lines[0], second.stderr
    assert proc.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 301))
    assert second_started < first_ended, "the first run ended before the second started"


def test_the_failing_rank_has_the_last_word(digits_dir, tmp_path):
    """launch/local.sh: a rank whose shard is empty fails with one line (a user error); its
    peer stops with one line; torchrun reports; the cause is printed again, last."""
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes((digits_dir / "train-000000.tar").read_bytes())
    tarfile.open(shards / "b.tar", "w").close()  # a valid tar without a sample
    tag = uuid.uuid4().hex
    env = {**cli_env(), "PYTHON": sys.executable, "DIST_CONTRAST_TEST_TAG": tag}
    args = _args(digits_dir, tmp_path, "empty", 1, 20)
    args[args.index(f"data.train_shards={digits_dir}/train-*.tar")] = (
        f"data.train_shards={shards}/*.tar"
    )
    try:
        proc = subprocess.run(
            ["launch/local.sh", "2", *args[1:]],  # args[0] is --config: local.sh takes it bare
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        time.sleep(1.0)
        left = _tagged_pids(tag)
    finally:
        _kill_tagged(tag)
    assert proc.returncode != 0 and left == []
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("dist-contrast: error: [rank "), proc.stderr[-3000:]
    assert "got no full batch" in last
    assert "dist_contrast/" not in proc.stderr  # no rank's traceback


def _rank_pid(tag: str, rank: int, launcher: int) -> int | None:
    """The training process of ``rank`` in the tagged job: a child of torchrun (``launcher``)
    with that RANK (its loader workers are its own children)."""
    for pid in _tagged_pids(tag):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher and f"RANK={rank}".encode() in env:
            return pid
    return None


def test_a_killed_rank_ends_the_job_promptly(digits_dir, tmp_path):
    """SIGKILL of rank 1 mid-run: its peer's collective fails at once (the connection closes),
    it leaves with one line, and torchrun ends the job: 7 s here (the old code: 31 s, until
    torchrun's SIGKILL 30 s after its SIGTERM, the survivor's loader keeping it alive)."""
    args = ["-m", "dist_contrast.cli", "train", *_args(digits_dir, tmp_path, "kill", 2, 2000)]
    with _torchrun(args) as (proc, tag):
        _wait_for(tmp_path / "kill" / "metrics.jsonl", proc)
        victim = _rank_pid(tag, 1, proc.pid)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        err, elapsed, left = _finish(proc, tag, 90)
    assert proc.returncode != 0 and left == [], err[-3000:]
    assert elapsed < 25, f"the job took {elapsed:.0f} s to end after the kill\n{err[-3000:]}"
