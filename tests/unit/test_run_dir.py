"""What guards a run directory: the lock of the run that owns it, the metrics rows a resume
drops, the world size a checkpoint's ZeRO partitions were written for."""

import json

import pytest

from dist_contrast.errors import CheckpointError
from dist_contrast.train.checkpoint import check_world, zero_world
from dist_contrast.train.metrics import SampleKeyLog, _drop_rows_after
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


def test_sample_keys_of_a_resume_on_fewer_ranks_hold_each_step_once(tmp_path):
    """4 ranks log steps 1-3 and die; 2 ranks resume from step 2: the rows of step 3 go, also
    from the files of ranks 2 and 3, which the new world does not have."""
    old = [SampleKeyLog(tmp_path, 0, r, 4) for r in range(4)]
    for step in (1, 2, 3):
        for r, log in enumerate(old):
            log.write(step, [f"s{step}r{r}"])
    for log in old:
        log.close()
    new = [SampleKeyLog(tmp_path, 2, r, 2) for r in (1, 0)]  # rank 0 last: it is not first
    for r, log in enumerate(reversed(new)):
        log.write(3, [f"new{r}"])
        log.close()
    steps = {}
    for path in sorted((tmp_path / "sample_keys").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["keys"])
    assert steps == {
        1: ["s1r0", "s1r1", "s1r2", "s1r3"],
        2: ["s2r0", "s2r1", "s2r2", "s2r3"],
        3: ["new0", "new1"],
    }


def test_sample_keys_refuse_a_link_or_a_fifo(tmp_path):
    """Appending to a planted FIFO would block the rank; to a link, write outside the run."""
    import os

    folder = tmp_path / "sample_keys"
    folder.mkdir()
    os.mkfifo(folder / "rank_00000.jsonl")
    with pytest.raises(CheckpointError, match="not a regular file"):
        SampleKeyLog(tmp_path, 0, 0, 1)
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (folder / "rank_00001.jsonl").symlink_to(outside)
    with pytest.raises(CheckpointError, match="not a regular file"):
        SampleKeyLog(tmp_path, 0, 1, 2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "sample_keys").symlink_to(folder)
    with pytest.raises(CheckpointError, match="not a folder of this run"):
        SampleKeyLog(other, 0, 0, 1)


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
