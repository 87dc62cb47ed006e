"""A process killed (SIGKILL) in the middle of writing a checkpoint leaves the previous one
complete, ``latest`` pointing at it, and the half-written directory ignored, then removed by the
next save; DeepSpeed resumes from ``latest`` with its step and weights."""

import os
import signal

import torch
import torch.multiprocessing as mp

from dist_contrast.distributed import free_port
from dist_contrast.train import checkpoint

from conftest import config_from_dict
from multiproc import run_ranks


def _engine(run_dir):
    from dist_contrast.methods import build_method
    from dist_contrast.train.setup import wrap

    cfg = config_from_dict(
        {
            "run": {"dir": str(run_dir)},
            "model": {"width": 4, "proj_hidden_dim": 16, "proj_dim": 8},
            "train": {"batch_size": 8},
            "deepspeed": {"zero_stage": 2},
        }
    )
    torch.manual_seed(0)
    engine, _, _ = wrap(build_method(cfg), cfg, 1)
    return engine


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _save_then_die(root, port):
    """Save step 2 fully; start saving step 4 and SIGKILL this process after its first file."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    engine = _engine(root.parent)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    checkpoint.save(engine, root, 2, keep=3, rank_state={"world": 1})
    torch.save(_weights(engine), root.parent / "weights_step2.pt")
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    real_save = torch.save

    def save_and_die(obj, f, *args, **kwargs):  # the write lands, then the process is killed
        real_save(obj, f, *args, **kwargs)
        if ".tmp_step_00000004" in str(f):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_and_die
    checkpoint.save(engine, root, 4, keep=3, rank_state={"world": 1})


def _resume(rank, world, root):
    engine = _engine(root.parent)
    step_dir = checkpoint.read_latest(root)
    client = checkpoint.load(engine, step_dir)
    loaded = _weights(engine)
    checkpoint.save(engine, root, 4, keep=3, rank_state={"world": 1})
    return step_dir.name, client["step"], loaded


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    proc = mp.get_context("spawn").Process(target=_save_then_die, args=(root, free_port()))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL
    partial = root / ".tmp_step_00000004"
    assert partial.is_dir() and any(partial.rglob("*.pt"))  # killed inside the write
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert [p.name for p in checkpoint.step_dirs(root)] == ["step_00000002"]

    ((name, step, loaded),) = run_ranks(_resume, 1, root, timeout=300)
    assert name == "step_00000002" and step == 2
    saved = torch.load(tmp_path / "weights_step2.pt")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # The next save of step 4 removed the half-written directory and moved `latest`.
    assert not partial.exists()
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert [p.name for p in checkpoint.step_dirs(root)] == ["step_00000002", "step_00000004"]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
