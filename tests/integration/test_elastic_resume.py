"""A run resumed on another number of ranks and loader workers, through the training entry:
what the resume line says is what was re-dealt, and the run trains on to its end."""

from __future__ import annotations

import json
import re
import tarfile

import pytest
import torch

from dist_contrast.train import checkpoint

from conftest import eight_step_digits_run, finite_number, run_torchrun


def _shard_keys(digits_dir) -> set[str]:
    keys = set()
    for shard in sorted(digits_dir.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    return keys


def _samples(digits_dir) -> int:
    return len(_shard_keys(digits_dir))


def test_moco_v2_two_ranks_two_workers_resumes_on_three_ranks_one_worker(digits_dir, tmp_path):
    """MoCo v2 (ZeRO-2, a 256-key queue) on 2 ranks x 2 workers, stopped at step 4, resumed
    on 3 ranks x 1 worker: the queue becomes 255 keys (the nearest multiple of 3, said), the
    rest of the epoch is the samples not consumed (counted from the shards), the ZeRO
    partitions are converted, and the run ends at step 8 with a checkpoint of 3 ranks."""
    base = eight_step_digits_run(tmp_path, digits_dir)
    args = ["train", "--config", "configs/moco_v2_digits.yaml"]
    first = {**base, "train.stop_at": 4, "data.num_workers": 2}
    proc = run_torchrun(2, *args, *[f"{k}={v}" for k, v in first.items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rest = {**base, "checkpoint.resume": "latest", "data.num_workers": 1}
    proc = run_torchrun(3, *args, *[f"{k}={v}" for k, v in rest.items()], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    left = _samples(digits_dir) - 4 * 2 * 32  # 4 steps of 2 ranks x 32 samples consumed
    assert "the resumed run keeps 255 keys (85 a rank)" in proc.stderr
    said = re.findall(r"dist-contrast: resumed step .*", proc.stderr)
    assert said == [
        f"dist-contrast: resumed step 4 on 3 rank(s) x 1 worker(s) (was 2 x 2): {left:,} "
        f"samples of epoch 0 left; queue 256 keys re-sharded into 255 (newest kept)"
    ], proc.stderr[-3000:]

    run = tmp_path / "moco_v2_digits"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert all(finite_number(r["loss"]) for r in rows if "loss" in r), rows
    last = run / "checkpoints" / "step_00000008"
    for rank in range(3):
        state = checkpoint.load_rank_state(last, rank)
        assert state["world"] == 3
        keys = state["method"]["queue"]["keys"]
        assert keys.shape[0] == 85 and torch.isfinite(keys).all()
    assert checkpoint.load_rank_state(last, 3) is None


def _key_rows(run) -> dict[int, list[list[str]]]:
    rows: dict[int, list[list[str]]] = {}
    for path in sorted((run / "sample_keys").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["step"], []).append(row["keys"])
    return rows


@pytest.mark.ranks32
def test_elastic_chain_32_8_16_ranks_through_the_cli(tmp_path_factory):
    """SimCLR with a global batch of 64 on 32 ranks x 2 for 2 steps, resumed on 8 x 8 for
    2 more, then on 16 x 4 for 2 more, through torchrun and the training entry, with
    ``logging.sample_keys``: each step is logged once, by as many ranks as it ran on; the 384
    samples consumed are 384 distinct keys of the shards (none read twice across two changes
    of world size), and each resume line counts the rest of epoch 0 from the shards."""
    from dist_contrast.data.write.digits import write_digits

    digits = tmp_path_factory.mktemp("digits_40")
    write_digits(digits, shard_size=40)  # 38 train shards: one at least for each of 32 readers
    total = _samples(digits)
    run_dir = tmp_path_factory.mktemp("chain")
    base = {
        **eight_step_digits_run(run_dir, digits),
        "train.steps": 6,
        "checkpoint.every": 2,
        "data.num_workers": 0,
        "model.width": 4,
        "logging.sample_keys": "true",
        "logging.plots": "false",
        "deepspeed.zero_stage": 0,  # the data path is under test; ZeRO-2's set-up x 32 is not
    }
    args = ["train", "--config", "configs/simclr_digits.yaml"]
    consumed, prev = 0, 0
    for world, stop, resume in ((32, 2, ""), (8, 4, "latest"), (16, 6, "latest")):
        over = {**base, "train.batch_size": 64 // world, "train.stop_at": stop}
        if resume:
            over["checkpoint.resume"] = resume
        proc = run_torchrun(world, *args, *[f"{k}={v}" for k, v in over.items()], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if resume:
            said = re.findall(r"resumed step \d+ on .*?samples of epoch \d+ left", proc.stderr)
            assert said == [
                f"resumed step {stop - 2} on {world} rank(s) x 1 worker(s) (was "
                f"{prev} x 1): {total - consumed:,} samples of epoch 0 left"
            ], proc.stderr[-3000:]
        consumed += 2 * 64
        prev = world

    rows = _key_rows(run_dir / "simclr_digits")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [len(rows[s]) for s in sorted(rows)] == [32, 32, 8, 8, 16, 16]  # ranks per step
    keys = [k for s in rows for batch in rows[s] for k in batch]
    assert len(keys) == 6 * 64 and len(set(keys)) == len(keys)  # none twice
    assert set(keys) <= _shard_keys(digits)
