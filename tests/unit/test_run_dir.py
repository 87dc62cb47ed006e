"""What guards a run directory: the lock of the run that owns it, the metrics rows a resume
drops, the world size a checkpoint's ZeRO partitions were written for."""

import json

import pytest

from dist_contrast.errors import CheckpointError
from dist_contrast.train.checkpoint import check_world, zero_world
from dist_contrast.train.metrics import _drop_rows_after
from dist_contrast.train.runs import lock_run_dir


def test_a_run_dir_has_one_owner_and_no_stale_lock(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    first = lock_run_dir(run_dir)
    with pytest.raises(CheckpointError, match=r"is in use by another run \(pid \d+ on "):
        lock_run_dir(run_dir)
    first.close()  # what the kernel does when the owner dies, however it dies
    lock_run_dir(run_dir).close()


def test_a_resume_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30, 40)]
    path.write_text("\n".join(rows) + '\n{"step": 5')  # the killed run's torn last line
    _drop_rows_after(path, 20)  # resumed from step 20: 30 and 40 are logged again
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    _drop_rows_after(tmp_path / "none.jsonl", 0)  # a fresh run: nothing to do


def test_zero_partitions_resume_on_another_world_unless_incomplete(tmp_path):
    for rank in range(2):
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    (tmp_path / "mp_rank_00_model_states.pt").touch()
    assert zero_world(tmp_path) == 2
    check_world(tmp_path, 2)
    check_world(tmp_path, 1)  # converted when loaded (tests/integration/test_elastic_zero.py)
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"partitions of ranks \[1\] only: it is incomplete"):
        check_world(tmp_path, 1)
    stage0 = tmp_path / "stage0"
    stage0.mkdir()
    (stage0 / "mp_rank_00_model_states.pt").touch()
    check_world(stage0, 1)  # nothing partitioned: any world
