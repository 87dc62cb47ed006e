"""DeepSpeed's CPU paths made cheaper by deepspeed_api, each against DeepSpeed's own on 2 gloo
ranks, to the bit:

- the gradients' all-reduce bucket kept between steps (``keep_flat_buffer``, ZeRO-0): three
  steps leave the weights equal to three steps through DeepSpeed's flatten, and every step
  flattens into the same buffer;
- at ZeRO-2 and 3, the all-reduce bucket kept likewise (``keep_flat_buffer`` again) and the
  all-gather into a tensor (ZeRO-2's gather of the updated weights) done by broadcasts
  (``gather_by_broadcast_on_gloo``): three steps equal three through DeepSpeed's flatten and
  gloo's all-gather; the gather itself equals ``all_gather_into_tensor`` on 3 ranks, on a
  sub-group, in bf16, from an aliased input."""

import pytest
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors

from dist_contrast import distributed
from dist_contrast.data.loader import train_loader
from dist_contrast.methods import build_method
from dist_contrast.train.deepspeed_api import _KeptFlat
from dist_contrast.train.engine import Trainer
from dist_contrast.train.setup import wrap

from conftest import config_from_dict
from multiproc import run_ranks


def _cfg(digits, run_dir, stage):
    return config_from_dict(
        {
            "run": {"dir": str(run_dir), "name": f"z{stage}"},
            "data": {"train_shards": f"{digits}/train-*.tar", "num_workers": 0},
            "model": {"width": 4, "proj_hidden_dim": 16, "proj_dim": 8},
            "train": {"batch_size": 8, "steps": 10, "warmup_steps": 2},
            "deepspeed": {"zero_stage": stage},
            "logging": {"wandb": False, "progress": False, "plots": False},
        }
    )


def _three_steps(cfg, rank, world, swap, watch=None):
    """Three steps of a fresh engine (``swap(engine)`` first) and its weights; ``watch(engine)``
    after each step."""
    torch.manual_seed(cfg.run.seed)
    engine, _, scheduler = wrap(build_method(cfg), cfg, world)
    swap(engine)
    loader = train_loader(cfg.data, cfg.augment, cfg.train.batch_size, 0, rank, world)
    try:
        trainer = Trainer(cfg, engine, scheduler, loader, rank, world)
        batches = iter(trainer.loader)
        for _ in range(3):
            trainer.train_step(trainer.augment_batch(next(batches)))
            if watch:
                watch(engine)
    finally:
        loader.close()
    return torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])


def _kept_and_own(rank, world, digits, run_dir):
    cfg, pointers = _cfg(digits, run_dir, 0), []

    def kept(engine):
        assert isinstance(engine.flatten, _KeptFlat)

    def own(engine):
        engine.flatten = _flatten_dense_tensors  # DeepSpeed's

    def watch(engine):
        pointers.extend(b.data_ptr() for b in engine.flatten.buffers.values())

    return (
        _three_steps(cfg, rank, world, kept, watch),
        _three_steps(cfg, rank, world, own),
        pointers,
    )


def test_kept_buffer_steps_equal_deepspeeds_flatten(digits_dir, tmp_path):
    for kept, own, pointers in run_ranks(_kept_and_own, 2, digits_dir, tmp_path):
        assert torch.equal(kept, own)
        assert len(pointers) == 3 and len(set(pointers)) == 1  # one buffer, every step


def test_kept_flat_values_and_bound():
    flat = _KeptFlat(keep=2)
    a = [torch.randn(3, 4), torch.randn(5)]
    first = flat(a)
    assert torch.equal(first, _flatten_dense_tensors(a))
    a[0].add_(1.0)
    again = flat(a)  # the same buffer, the new values
    assert again.data_ptr() == first.data_ptr()
    assert torch.equal(again, _flatten_dense_tensors(a))
    flat([torch.randn(7)])
    flat([torch.randn(2, dtype=torch.float64)])
    assert len(flat.buffers) == 2  # the oldest dropped past ``keep``


def _ours_and_deepspeeds(rank, world, digits, run_dir, stage):
    from deepspeed.comm import comm

    cfg, counts = _cfg(digits, run_dir, stage), []

    def ours(engine):
        assert comm.cdb.all_gather_function is distributed.all_gather_into_tensor
        assert "allreduce_bucket" in vars(engine.optimizer)

    def gloos(engine):
        comm.cdb.all_gather_function = dist.all_gather_into_tensor
        del engine.optimizer.allreduce_bucket  # the class's own again

    real = dist.broadcast
    weights = []
    for swap in (ours, gloos):
        seen = []
        dist.broadcast = lambda *a, _seen=seen, **k: _seen.append(1) or real(*a, **k)
        try:
            weights.append(_three_steps(cfg, rank, world, swap))
        finally:
            dist.broadcast = real
        counts.append(len(seen))
    return weights, counts


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_steps_equal_deepspeeds_own_paths(digits_dir, tmp_path, stage):
    for (ours, theirs), (ours_calls, their_calls) in run_ranks(
        _ours_and_deepspeeds, 2, digits_dir, tmp_path, stage
    ):
        assert torch.equal(ours, theirs)
        if stage == 2:  # beyond the broadcasts both make (DeepSpeed's at set-up): one per
            # rank and parameter group (2 here: decayed or not) in each of the 3 steps
            assert ours_calls - their_calls == 3 * 2 * 2


def _gathers(rank, world):
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank).to(dtype)
        want = torch.empty(2 * world, 3, dtype=dtype)
        dist.all_gather_into_tensor(want, x)
        got = torch.full_like(want, -1)
        assert distributed.all_gather_into_tensor(got, x) is None
        out.append(torch.equal(got, want))
        # the input a slice of the output, as ZeRO's partitions are
        flat = torch.full((world * 4,), -1.0).to(dtype)
        flat[rank * 4 : rank * 4 + 4] = rank + 1
        distributed.all_gather_into_tensor(flat, flat[rank * 4 : rank * 4 + 4])
        out.append(torch.equal(flat, torch.arange(1, world + 1).repeat_interleave(4).to(dtype)))
    sub = dist.new_group([0, 2])
    if rank in (0, 2):
        got = torch.empty(6)
        distributed.all_gather_into_tensor(got, torch.full((3,), float(rank)), group=sub)
        out.append(torch.equal(got, torch.tensor([0.0, 0, 0, 2, 2, 2])))
    return out


def test_gather_by_broadcast_equals_all_gather_into_tensor():
    results = run_ranks(_gathers, 3)
    assert [len(r) for r in results] == [5, 4, 5]
    assert all(all(r) for r in results)
