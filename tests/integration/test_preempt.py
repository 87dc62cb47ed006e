"""Preemption without Slurm: SIGUSR1 to one rank of a torchrun job stops both ranks at the same
step with one checkpoint; torchrun ends without a failure report (the ranks of an agreed stop
exit 0 under torchelastic) and the last line says so (the Slurm tests cover the requeue and the
exact resume; tests/integration/test_trust_preempt.py covers launch/local.sh's exit code 75)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_contrast.train import checkpoint

from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the training processes torchrun started (not their loader workers)."""
    out = {}
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        out[rank] = pid
    return out


def test_signal_to_one_rank_stops_every_rank_at_one_checkpoint(digits_dir, tmp_path):
    overrides = {
        "run.dir": tmp_path,
        "run.name": "run",
        "data.train_shards": f"{digits_dir}/train-*.tar",
        "data.val_shards": f"{digits_dir}/val-*.tar",
        "train.steps": 1000,
        "train.batch_size": 16,
        "train.log_every": 1,
        "checkpoint.every": 1000,
        "logging.wandb": "false",
        "logging.progress": "false",
        "logging.plots": "false",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "dist_contrast.cli", "train", "--config", "configs/simclr_digits.yaml"]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    pids = _rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGUSR1)  # rank 1 only: rank 0 learns it from the all-reduce
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 0, err[-3000:]  # no failure report from torchrun
    assert last.startswith("dist-contrast: preempted at step "), err[-3000:]
    assert "a stop signal to another rank" in last  # rank 0 prints it
    assert last.endswith(")") and "continue with checkpoint.resume=latest" in last
    stopped = int(last.split("preempted at step ")[1].split(";")[0])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert 2 <= stopped < 1000 and rows[-1]["step"] == stopped
    latest = checkpoint.read_latest(tmp_path / "run" / "checkpoints")
    assert latest.name == checkpoint.step_tag(stopped)
    for rank in (0, 1):  # one checkpoint, written by both ranks
        assert checkpoint.load_rank_state(latest, rank)["world"] == 2
