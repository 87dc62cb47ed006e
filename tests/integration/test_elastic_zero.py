"""ZeRO-2 and ZeRO-3 checkpoints written by 2 ranks resume on 1 and on 4:
right after ``checkpoint.load`` the fp32 weights equal the consolidated saved ones, Adam's
moments and step equal the 2-rank run's (gathered across its partitions before it saved),
every optimizer group keeps its settings, and the LR schedule and the training go on."""

import os
import shutil

import pytest
import torch
from torch import nn

from dist_contrast.errors import CheckpointError
from dist_contrast.train import checkpoint

from conftest import closed_form_lr, config_from_dict, finite_number
from multiproc import run_ranks

pytestmark = pytest.mark.slow
SAVED_AT, STEPS, BATCH = 3, 6, 4
MOMENTS = ("exp_avg", "exp_avg_sq")


class Tiny(nn.Module):
    """Matrices (decayed) and biases and a norm (not): both optimizer groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def _cfg(run_dir, stage, precision):
    return config_from_dict(
        {
            "run": {"dir": str(run_dir)},
            "train": {
                "batch_size": BATCH,
                "steps": STEPS,
                "warmup_steps": 2,
                "weight_decay": 0.1,
            },
            "deepspeed": {"zero_stage": stage, "precision": precision},
        }
    )


def _batch(step, rank):
    return torch.randn(BATCH, 5, generator=torch.Generator().manual_seed(1000 * step + rank))


def _train(engine, scheduler, rank, first, last):
    """Steps ``first`` .. ``last - 1``; the LR of the step after each."""
    dtype = next(engine.module.parameters()).dtype
    lrs = []
    for step in range(first, last):
        loss = engine(_batch(step, rank).to(dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    return lrs


def _full(engine, param, key=None):
    """The whole fp32 weight (``key`` None) or optimizer state of ``param``, gathered from the
    partitions of every rank, read from the optimizer's own tensors."""
    import torch.distributed as dist

    if hasattr(param, "ds_id"):  # ZeRO-3
        return param._z3_optimizer.get_full_hp_param(param, key).float().clone()
    opt = engine.optimizer  # ZeRO-1/2: this rank's fragment of the flat fp32 partition
    out = torch.zeros(param.numel())
    frag = param._hp_mapping
    if frag is not None:
        flat = opt.single_partition_of_fp32_groups[frag.param_group_index]
        src = flat if key is None else opt.optimizer.state[flat][key]
        hp, lp = frag.hp_fragment_address, frag.lp_fragment_address
        out.narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
    dist.all_reduce(out, group=param._dp_group)
    return out.reshape(param.shape)


def _state(engine, scheduler):
    base = scheduler.optimizer
    return {
        "params": {
            name: {key: _full(engine, p, key) for key in (None, *MOMENTS)}
            for name, p in engine.module.named_parameters()
        },
        "steps": sorted({float(s["step"]) for s in base.state.values()}),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
    }


def _save(rank, world, run_dir, stage, precision):
    from dist_contrast.train.setup import wrap

    torch.manual_seed(0)
    engine, _, scheduler = wrap(Tiny(), _cfg(run_dir, stage, precision), world)
    _train(engine, scheduler, rank, 0, SAVED_AT)
    client = {"scheduler": scheduler.state_dict()}
    root = run_dir / "checkpoints"
    checkpoint.save(engine, root, SAVED_AT, 2, {"world": world}, client)
    return _state(engine, scheduler)


def _resume(rank, world, run_dir, stage, precision):
    from dist_contrast.train.setup import wrap

    torch.manual_seed(1)  # other initial weights: the load must replace them all
    engine, _, scheduler = wrap(Tiny(), _cfg(run_dir, stage, precision), world)
    client = checkpoint.load(engine, run_dir / "checkpoints" / checkpoint.step_tag(SAVED_AT))
    scheduler.load_state_dict(client["scheduler"])
    loaded = _state(engine, scheduler)
    first = _train(engine, scheduler, rank, SAVED_AT, SAVED_AT + 1)
    after_one = {n: _full(engine, p) for n, p in engine.module.named_parameters()}
    lrs = first + _train(engine, scheduler, rank, SAVED_AT + 1, STEPS)
    final = {n: _full(engine, p) for n, p in engine.module.named_parameters()}
    return {"client_step": client["step"], "loaded": loaded, "after_one": after_one,
            "lrs": lrs, "final": final}  # fmt: skip


@pytest.fixture(scope="module", params=[(2, "fp32"), (3, "bf16")], ids=["zero2", "zero3"])
def saved(request, tmp_path_factory):
    """A run of 2 ranks, checkpointed at step 3; its state gathered just before the save."""
    stage, precision = request.param
    run_dir = tmp_path_factory.mktemp(f"zero{stage}")
    state = run_ranks(_save, 2, run_dir, stage, precision, timeout=300)[0]
    return run_dir, stage, precision, state


def _expected_lr(step):
    t = _cfg("unused", 2, "fp32").train
    return closed_form_lr(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)


@pytest.mark.parametrize("world", [1, 4])
def test_zero_checkpoint_resumes_on_another_world(saved, world):
    run_dir, stage, precision, before = saved
    step_dir = run_dir / "checkpoints" / checkpoint.step_tag(SAVED_AT)
    assert checkpoint.zero_world(step_dir) == 2
    checkpoint.check_world(step_dir, world)  # what works is no longer refused

    results = run_ranks(_resume, world, run_dir, stage, precision, timeout=300)
    out = results[0]
    assert out["client_step"] == SAVED_AT
    consolidated = checkpoint.load_model_state(step_dir)  # DeepSpeed's zero_to_fp32
    loaded = out["loaded"]
    assert loaded["params"].keys() == consolidated.keys()
    for name, want in consolidated.items():
        got = loaded["params"][name]
        assert torch.equal(got[None], want), name
        assert torch.equal(got[None], before["params"][name][None]), name
        for key in MOMENTS:  # gathered across the 2 saving ranks, then across the new ones
            assert got[key].abs().sum() > 0, (name, key)
            assert torch.equal(got[key], before["params"][name][key]), (name, key)
    assert loaded["steps"] == before["steps"] == [float(SAVED_AT)]
    assert loaded["groups"] == before["groups"]
    assert [g["weight_decay"] for g in loaded["groups"]] == [0.1, 0.0]  # biases stay undecayed
    assert loaded["groups"][0]["lr"] == pytest.approx(_expected_lr(SAVED_AT), rel=1e-12)

    # The schedule goes on where the uninterrupted one would, and so does the training.
    want_lrs = [_expected_lr(s) for s in range(SAVED_AT + 1, STEPS + 1)]
    for r in results:
        assert [lr[0] for lr in r["lrs"]] == pytest.approx(want_lrs, rel=1e-12)
        assert all(torch.equal(r["final"][n], out["final"][n]) for n in consolidated)
    for name, want in consolidated.items():
        assert torch.isfinite(out["final"][name]).all()
        assert not torch.equal(out["final"][name], want), name
    assert checkpoint.universal_dir(step_dir).is_dir()  # converted once, reused after
    assert not list(step_dir.parent.glob(".tmp_*"))

    if world == 1 and precision == "fp32":
        _first_step_is_adam_from_the_saved_state(out["after_one"], before)


def _first_step_is_adam_from_the_saved_state(after_one, before):
    """The step after the resume, redone by plain torch AdamW from the saved weights and
    moments (gradient clipped to train.grad_clip as DeepSpeed does): the moments are live."""
    from dist_contrast.train.optim import param_groups

    model = Tiny()
    params = before["params"]
    model.load_state_dict({n: params[n][None] for n in params})
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=_expected_lr(SAVED_AT))
    for name, p in named.items():
        opt.state[p] = {"step": torch.tensor(float(SAVED_AT))}
        opt.state[p].update({k: params[name][k].clone() for k in MOMENTS})
    model(_batch(SAVED_AT, 0)).pow(2).mean().backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    for name, p in named.items():
        torch.testing.assert_close(after_one[name], p.detach(), rtol=1e-5, atol=1e-7)
        assert not torch.equal(after_one[name], params[name][None])


def test_check_world_refuses_what_cannot_resume(saved, tmp_path):
    run_dir, _, _, _ = saved
    step_dir = run_dir / "checkpoints" / checkpoint.step_tag(SAVED_AT)
    copy = tmp_path / "checkpoints" / step_dir.name
    shutil.copytree(step_dir, copy)
    checkpoint.check_world(copy, 2)  # the same world: as before
    checkpoint.check_world(copy, 3)

    partial = tmp_path / "partial" / step_dir.name
    shutil.copytree(step_dir, partial)
    for path in partial.glob("*zero_pp_rank_0_*"):  # ZeRO-3: its model states too
        path.unlink()
    for world in (1, 2):
        with pytest.raises(CheckpointError, match=r"partitions of ranks \[1\] only"):
            checkpoint.check_world(partial, world)

    if os.geteuid() != 0:  # root writes anywhere
        os.chmod(copy.parent, 0o555)
        try:
            with pytest.raises(CheckpointError, match="ZeRO partitions of 2.*not writable"):
                checkpoint.check_world(copy, 1)
            checkpoint.check_world(copy, 2)
        finally:
            os.chmod(copy.parent, 0o755)


def test_cli_run_of_two_ranks_resumes_on_one(digits_dir, tmp_path):
    """Through the training entry: SimCLR on ZeRO-2 stopped at step 4 under torchrun (2 ranks),
    resumed by one process to step 8 with the LR of the uninterrupted schedule."""
    import json

    from conftest import eight_step_digits_run, run_cli, run_torchrun

    base = eight_step_digits_run(tmp_path, digits_dir)
    args = ["train", "--config", "configs/simclr_digits.yaml"]
    first = [f"{k}={v}" for k, v in {**base, "train.stop_at": 4}.items()]
    proc = run_torchrun(2, *args, *first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rest = [f"{k}={v}" for k, v in {**base, "checkpoint.resume": "latest"}.items()]
    proc = run_cli(*args, *rest)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "simclr_digits"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    t = config_from_dict({"train": {"steps": 8, "warmup_steps": 2}}).train
    want = [closed_form_lr(s, t.lr, 2, 8, t.min_lr_ratio) for s in range(1, 9)]  # after step s
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
    assert all(finite_number(r["loss"]) for r in rows), rows
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    assert checkpoint.universal_dir(ckpts / "step_00000004").is_dir()
