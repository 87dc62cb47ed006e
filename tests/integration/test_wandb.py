"""wandb as users run it: the real wandb (offline; nothing can go online here), its mode from
the config unless WANDB_MODE says otherwise, one wandb run per training run across resumes.

The offline run files are read back with a small reader of wandb's transaction log (a
LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs after a 7-byte ``:W&B`` header),
so the test sees what ``wandb sync`` would upload."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import ROOT, cli_env, run_cli

pytestmark = pytest.mark.slow  # launches real training processes: make test-slow, CI

CONFIG = "configs/simclr_digits.yaml"
BLOCK = 32768  # the log's block size; a record header never straddles two blocks


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the rest of a block is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind in (2, 3):  # first, middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def _offline_runs(run: Path) -> list[tuple[set[str], list[int]]]:
    """(run ids, history steps) of each offline run folder, oldest first."""
    out = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        ids, steps = set(), []
        for raw in _records(next(folder.glob("run-*.wandb"))):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                steps.append(record.history.step.num)
        out.append((ids, steps))
    return out


def _train(digits_dir, tmp_path, *extra, env=None):
    args = [
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",  # trained only, never evaluated
        "model.width=4",
        "train.batch_size=16",
        "train.steps=6",
        "train.log_every=1",
        "checkpoint.every=3",
        "logging.progress=false",
        "logging.plots=false",
        *extra,
    ]
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        proc = run_cli("train", "--config", CONFIG, *args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_resumed_run_continues_its_wandb_run(digits_dir, tmp_path):
    _train(digits_dir, tmp_path, "train.stop_at=3")
    _train(digits_dir, tmp_path, "checkpoint.resume=latest")
    run = tmp_path / "simclr_digits"
    (ids1, steps1), (ids2, steps2) = _offline_runs(run)
    assert ids1 == ids2 == {(run / "wandb" / "run_id").read_text().strip()}
    assert steps1 == [1, 2, 3] and steps2 == [4, 5, 6]


def test_wandb_mode_from_the_environment_wins(digits_dir, tmp_path):
    # online in the config would need the network; WANDB_MODE=offline keeps it offline
    _train(digits_dir, tmp_path, "logging.wandb_mode=online", env={"WANDB_MODE": "offline"})
    ((ids, steps),) = _offline_runs(tmp_path / "simclr_digits")
    assert len(ids) == 1 and steps == list(range(1, 7))
    _train(digits_dir, tmp_path, "run.name=off", env={"WANDB_MODE": "disabled"})
    assert not list((tmp_path / "off" / "wandb").glob("offline-run-*"))


def _wandb_core(parent: int) -> int | None:
    """The pid of the wandb service started for process ``parent``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[0].endswith(b"wandb-core") and str(parent).encode() in cmd:
                return int(entry.name)
    return None


def test_a_run_outlives_its_wandb_service(digits_dir, tmp_path):
    """wandb mirrors metrics.jsonl; its service dying (here SIGKILL) must not end the run."""
    args = [
        f"run.dir={tmp_path}",
        f"data.train_shards={digits_dir}/train-*.tar",
        "data.val_shards=",  # trained only, never evaluated
        "model.width=4",
        "train.batch_size=16",
        "train.steps=600",
        "train.log_every=1",
        "checkpoint.every=600",
        "logging.progress=false",
        "logging.plots=false",
    ]
    cmd = [sys.executable, "-m", "dist_contrast.cli", "train", "--config", CONFIG, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "simclr_digits" / "metrics.jsonl"
        deadline, core = time.monotonic() + 120, None
        while core is None and proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and metrics.stat().st_size:  # wandb.init is done by then
                core = _wandb_core(proc.pid)
            time.sleep(0.1)
        assert core is not None, "no wandb service came up"
        os.kill(core, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "dist-contrast: warning: wandb stopped" in err
    rows = (tmp_path / "simclr_digits" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 600
