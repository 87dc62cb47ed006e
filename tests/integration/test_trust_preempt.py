"""Preemption ends as a preemption: exit code 75 and the line "preempted at step N;
..." last from launch/local.sh, whichever process the signal reached, and a stop signal during a
wait for data ends the run within the grace period instead of being absorbed.

Real torchrun, DeepSpeed and loader workers; the data stalls for real: a ``pipe:`` shard whose
command sends part of a real shard, then sleeps for minutes (ignoring the stop signals, as a
stuck read does), or sleeps a few seconds before the rest."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_run_ends import _finish, started

from dist_contrast.train import checkpoint, preempt
from dist_contrast.train.preempt import EXIT_PREEMPTED

from conftest import ROOT, cli_env

LINE = re.compile(
    r"^dist-contrast: preempted at step (\d+); continue with checkpoint\.resume=latest"
)
SAMPLE_BYTES = 8192  # a digits sample in a shard: 4 members of 512-byte header + 1 block, padded


def _overrides(run_dir: Path, shards: str, **extra) -> list[str]:
    keys = {
        "run.dir": run_dir.parent,
        "run.name": run_dir.name,
        "data.train_shards": shards,
        "data.val_shards": "",
        "data.shuffle_buffer": 16,
        "train.steps": 1000,
        "train.batch_size": 16,
        "train.log_every": 1,
        "checkpoint.every": 1000,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in keys.items()]


def _stalling(shard: Path, samples: int, stall_s: int, flag: Path, rest: bool = False) -> str:
    """A ``pipe:`` shard: the first ``samples`` samples of ``shard``, then ``flag`` is touched
    and the command sleeps ``stall_s`` seconds, deaf to stop signals (then sends the rest if
    ``rest``)."""
    n = samples * SAMPLE_BYTES
    cmd = f"trap '' TERM USR1; head -c {n} {shard}; touch {flag}; sleep {stall_s}"
    return "pipe:" + cmd + (f"; tail -c +{n + 1} {shard}" if rest else "")


def _started(cmd: list[str]):
    """``cmd`` in a session of its own, its processes tagged; none survives the block."""
    return started(cmd, {**cli_env(), "PYTHON": sys.executable}, new_session=True)


def _local(nproc: int, run_dir: Path, shards: str, **extra) -> list[str]:
    args = ["configs/simclr_digits.yaml", *_overrides(run_dir, shards, **extra)]
    return ["bash", str(ROOT / "launch/local.sh"), str(nproc), *args]


def _single(run_dir: Path, shards: str, **extra) -> list[str]:
    args = [
        "train",
        "--config",
        "configs/simclr_digits.yaml",
        *_overrides(run_dir, shards, **extra),
    ]
    return [sys.executable, "-m", "dist_contrast.cli", *args]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(s) for s in path.read_text().splitlines()] if path.is_file() else []


def _listing(run_dir: Path) -> tuple[list[int], list[str]]:
    """What a stop must not lose: the metrics rows and the checkpoint directories."""
    return [r["step"] for r in _rows(run_dir)], [
        p.name for p in checkpoint.step_dirs(run_dir / "checkpoints")
    ]


def _wait_rows(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(_rows(run_dir)) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {n} steps within {timeout} s"
        time.sleep(0.1)


def _wait_stalled(proc: subprocess.Popen, run_dir: Path, flags: list[Path], every: int) -> None:
    """Until every stalling command sleeps and the run has been waiting for data for 2 s: no
    step logged and no checkpoint written meanwhile, that of the last step written if due
    (checkpoint.every=``every``), so the rank is not starting up or in the middle of a save."""

    def state() -> tuple:
        pointer = run_dir / "checkpoints" / "latest"
        latest = pointer.read_text().strip() if pointer.is_file() else ""
        return [r["step"] for r in _rows(run_dir)], latest

    deadline = time.monotonic() + 240
    seen, since = state(), time.monotonic()
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the data never stalled"
        time.sleep(0.1)
        now = state()
        if now != seen:
            seen, since = now, time.monotonic()
        steps, latest = now
        saved = steps and (steps[-1] % every or latest == checkpoint.step_tag(steps[-1]))
        if all(f.exists() for f in flags) and saved and time.monotonic() - since >= 2:
            return


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _torchrun_of(local_sh: int) -> int:
    """The torchrun that launch/local.sh started."""
    for pid in _children(local_sh):
        if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("launch/local.sh runs no torchrun")


def _ended(proc: subprocess.Popen, tag: str, timeout: float) -> tuple[str, float]:
    """(stderr, seconds until the job ended); fails if it does not end, or leaves processes."""
    err, elapsed, left = _finish(proc, tag, timeout)
    assert left == [], f"processes left behind: {left}\n{err[-3000:]}"
    return err, elapsed


def _preempted(err: str) -> tuple[int, str]:
    """The step of the last line, which must be "preempted at step N; ...", and the line."""
    last = err.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match, f"last line: {last!r}\n{err[-3000:]}"
    return int(match.group(1)), last


# ----------------------------------------------------------------------------------------------
# launch/local.sh: exit 75 whichever process gets the signal, and the resumed run goes on


TARGETS = ("launch/local.sh", "torchrun", "rank 1")


def _signal(local_sh: int, target: str) -> None:
    torchrun = _torchrun_of(local_sh)
    pid = {"launch/local.sh": local_sh, "torchrun": torchrun}.get(target)
    if pid is None:
        pid = max(_children(torchrun))  # a rank (the second one started)
    os.kill(pid, signal.SIGTERM)


@pytest.mark.slow
def test_local_sh_exits_75_whoever_gets_the_signal_and_the_run_resumes(digits_dir, tmp_path):
    """One run, stopped three times (a SIGTERM to launch/local.sh, to its torchrun, to a rank)
    and resumed each time: each stop exits 75 with the line last and the checkpoint of its
    step, and each resumed run continues from it (no step replayed or skipped)."""
    run = tmp_path / "run"
    shards = f"{digits_dir}/train-*.tar"
    stops = []
    for i, target in enumerate(TARGETS):
        extra = {"checkpoint.resume": "latest"} if i else {}
        with _started(_local(2, run, shards, **extra)) as (proc, tag):
            _wait_rows(proc, run, len(_rows(run)) + 2)
            _signal(proc.pid, target)
            err, _ = _ended(proc, tag, timeout=120)
        assert proc.returncode == EXIT_PREEMPTED, f"{target}: {err[-3000:]}"
        stopped, line = _preempted(err)
        assert "every rank wrote the checkpoint of step" in line, line
        assert checkpoint.read_latest(run / "checkpoints").name == checkpoint.step_tag(stopped)
        assert [r["step"] for r in _rows(run)] == list(range(1, stopped + 1)), target
        assert not stops or stopped > stops[-1]
        stops.append(stopped)
    final = stops[-1] + 1
    with _started(
        _local(2, run, shards, **{"checkpoint.resume": "latest", "train.stop_at": final})
    ) as (proc, tag):
        err, _ = _ended(proc, tag, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert [r["step"] for r in _rows(run)] == list(range(1, final + 1))
    assert checkpoint.read_latest(run / "checkpoints").name == checkpoint.step_tag(final)


# ----------------------------------------------------------------------------------------------
# A stop signal while the data stalls


@pytest.mark.slow
def test_stop_during_a_stalled_data_wait_ends_the_run_and_loses_nothing(digits_dir, tmp_path):
    """One process: the shard stalls after 3 steps (checkpoint at step 2), SIGTERM: the run
    ends within 30 s (default grace, 10 s), exit 75, its line says that step 3 is lost; the
    stalled command is gone; metrics rows and checkpoints are those of before the signal; the
    resumed run takes the lost step again."""
    run, flag = tmp_path / "run", tmp_path / "stalled"
    shards = _stalling(digits_dir / "train-000000.tar", 70, 600, flag)
    with _started(_single(run, shards, **{"checkpoint.every": 2})) as (proc, tag):
        _wait_stalled(proc, run, [flag], every=2)
        before = _listing(run)
        os.kill(proc.pid, signal.SIGTERM)
        err, elapsed = _ended(proc, tag, timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert elapsed < 30, f"{elapsed:.0f} s"
    assert _listing(run) == before
    steps, saved = before
    stopped, line = _preempted(err)
    assert stopped == steps[-1] and saved[-1] == checkpoint.step_tag(2), (before, line)
    lost = "step 3 is" if stopped == 3 else f"steps 3-{stopped} are"
    assert f"goes back to the checkpoint of step 2: {lost} lost" in line, line
    assert "no batch came within train.stop_grace_s=10 s" in line
    flag.unlink()
    resume = {"checkpoint.resume": "latest", "checkpoint.every": 2, "train.stop_at": 3}
    with _started(_single(run, shards, **resume)) as (proc, tag):
        err, _ = _ended(proc, tag, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]


@pytest.mark.slow
def test_a_batch_within_the_grace_ends_in_the_agreed_stop(digits_dir, tmp_path):
    """The data comes back 8 s into the stall, within the grace: the step ends and the stop is
    the usual one, with a checkpoint of that step."""
    run, flag = tmp_path / "run", tmp_path / "stalled"
    shards = _stalling(digits_dir / "train-000000.tar", 40, 8, flag, rest=True)
    with _started(_single(run, shards)) as (proc, tag):
        _wait_stalled(proc, run, [flag], every=1000)
        steps, _ = _listing(run)
        os.kill(proc.pid, signal.SIGTERM)
        err, _ = _ended(proc, tag, timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    stopped, line = _preempted(err)
    assert stopped == steps[-1] + 1, (steps, line)
    assert "SIGTERM; every rank wrote the checkpoint of step" in line, line
    assert checkpoint.read_latest(run / "checkpoints").name == checkpoint.step_tag(stopped)


@pytest.mark.slow
def test_stop_while_one_rank_stalls_and_its_peer_waits_in_a_collective(digits_dir, tmp_path):
    """Two ranks under launch/local.sh: one rank's shard stalls a batch earlier than the
    other's, so one rank waits for data while its peer waits in the step's all-gather.
    SIGTERM to launch/local.sh: both leave within 30 s, exit 75, the line last, nothing left
    running, nothing written lost."""
    run = tmp_path / "run"
    flags = [tmp_path / "stalled0", tmp_path / "stalled1"]
    urls = [
        _stalling(digits_dir / "train-000000.tar", 86, 600, flags[0]),
        _stalling(digits_dir / "train-000001.tar", 70, 600, flags[1]),
    ]
    with _started(_local(2, run, f"[{', '.join(urls)}]", **{"checkpoint.every": 2})) as (proc, tag):
        _wait_stalled(proc, run, flags, every=2)
        before = _listing(run)
        os.kill(proc.pid, signal.SIGTERM)
        err, elapsed = _ended(proc, tag, timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert elapsed < 30, f"{elapsed:.0f} s\n{err[-3000:]}"
    assert _listing(run) == before
    stopped, line = _preempted(err)
    assert stopped == before[0][-1] and "goes back to the checkpoint of step 2" in line, line
    assert "another rank left during step" in err  # the peer blocked in the collective


# ----------------------------------------------------------------------------------------------
# The wait itself, in this process


def _blocked(pid: int) -> set[int]:
    """The signals ``pid`` blocks (SigBlk of its status)."""
    mask = next(
        int(line.split()[1], 16)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("SigBlk:")
    )
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_the_wait_acts_on_a_signal_and_what_it_forks_holds_them_blocked(tmp_path):
    """A Fetcher whose items never come: SIGTERM to this process ends the wait once the grace
    is over, raised in the waiting thread; a process forked while getting an item (a loader
    worker started lazily) holds the stop signals blocked."""
    child: dict[str, int] = {}

    def items():
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        worker.start()  # forked by the fetching thread, as a loader's worker started lazily
        child["pid"] = worker.pid
        time.sleep(60)
        yield 1

    with preempt.StopSignals(grace_s=0.5) as stop:
        fetcher = preempt.Fetcher(items())
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        start = time.monotonic()

        def give_up():
            return stop.alone(3, 2, "test") if stop.expired() else None

        with pytest.raises(preempt.Preempted) as raised:
            fetcher.next(give_up)
        elapsed = time.monotonic() - start
        blocked = _blocked(child["pid"])
        os.kill(child["pid"], signal.SIGKILL)
        fetcher.close()
    assert 0.9 < elapsed < 5, elapsed
    assert {signal.SIGTERM, signal.SIGUSR1} <= blocked
    assert raised.value.code == EXIT_PREEMPTED and not raised.value.agreed
    assert raised.value.line().startswith(
        "dist-contrast: preempted at step 3; continue with checkpoint.resume=latest, which goes "
        "back to the checkpoint of step 2: step 3 is lost (SIGTERM, test)"
    )


def test_a_peer_that_left_without_its_stop_line_was_killed(tmp_path, monkeypatch):
    """The stop line file tells a peer that stopped alone (its line written before it exits)
    from one killed outright (none): only the first makes this rank's exit a preemption. A
    FIFO at the path is looked at, never opened; no launcher file: a stop, as before."""
    monkeypatch.delenv(preempt.STATUS_ENV, raising=False)
    assert preempt.peer_stopped(wait_s=0)
    path = tmp_path / "preempted"
    monkeypatch.setenv(preempt.STATUS_ENV, str(path))
    t0 = time.monotonic()
    assert not preempt.peer_stopped(wait_s=0.3)  # killed: no line within the wait
    assert time.monotonic() - t0 >= 0.3
    writer = threading.Timer(0.2, lambda: path.write_text("dist-contrast: preempted at step 3;\n"))
    writer.start()
    assert preempt.peer_stopped(wait_s=5)  # the line comes after the peer's exit was seen
    writer.join()
    path.unlink()
    os.mkfifo(path)
    assert not preempt.peer_stopped(wait_s=0.1)
