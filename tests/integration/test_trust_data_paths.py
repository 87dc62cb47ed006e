"""Paths that are not regular files among the shards, as a user's glob or list can match them: a
real FIFO (sorting first, so that ``--check`` reads it first), a directory matched by the glob,
a directory and a character device given literally, a link to /dev/zero. ``train --check``
returns in seconds and a short run trains, each naming what it skipped."""

from __future__ import annotations

import json
import os

from conftest import run_cli

CONFIG = "configs/simclr_digits.yaml"


def _odd_shards(digits_dir, tmp_path) -> str:
    mirror = tmp_path / "shards"
    mirror.mkdir()
    for path in sorted(digits_dir.glob("train-*.tar")):
        (mirror / path.name).symlink_to(path)
    os.mkfifo(mirror / "train-0.tar")  # sorts before train-000000.tar
    (mirror / "train-00.tar").mkdir()
    (mirror / "train-zero.tar").symlink_to("/dev/zero")
    (tmp_path / "given.tar").mkdir()
    return f"[{mirror}/train-*.tar, {tmp_path}/given.tar, /dev/null]"


def _args(tmp_path, shards: str, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        CONFIG,
        f"run.dir={tmp_path / 'runs'}",
        "run.name=odd",
        f"data.train_shards={shards}",
        "data.val_shards=",
        "data.num_workers=1",
        "model.width=4",
        "train.batch_size=16",
        "train.steps=3",
        "train.log_every=1",
        "checkpoint.every=3",
        "logging.wandb=false",
        "logging.progress=false",
        "logging.plots=false",
        *extra,
    ]


def _skipped_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "not regular files" in ln]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_fifo_device_and_directory_shards_are_skipped_not_waited_on(digits_dir, tmp_path):
    shards = _odd_shards(digits_dir, tmp_path)
    check = run_cli(*_args(tmp_path, shards), "--check", timeout=60)  # killed if it blocks
    assert check.returncode == 0, check.stderr[-3000:]
    line = _skipped_line(check.stderr)
    assert "data.train_shards: skipped 5 path(s)" in line, line
    for part in ("train-0.tar (FIFO)", "train-00.tar (directory)", "given.tar (directory)"):
        assert part in line, line
    assert "train-zero.tar (character device)" in line and "/dev/null (character device)" in line

    run = run_cli(*_args(tmp_path, shards), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data.train_shards: skipped 5 path(s)" in _skipped_line(run.stderr)
    rows = [json.loads(r) for r in (tmp_path / "runs/odd/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["skipped_total"] == 0  # nothing was opened that is not a shard
