"""The momentum (EMA) update gives the same momentum weights under ZeRO stages 0, 2 and 3."""

import pytest
import torch
from torch import nn

from dist_contrast.methods.momentum import ema_update, make_target, momentum_at

from multiproc import run_ranks

STEPS = 5


class Twin(nn.Module):
    """An online network trained by SGD and its momentum twin, used in the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.online = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        self.target = make_target(self.online)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.online(x)
        return ((out - 1.0) ** 2).mean() + 0.1 * ((out - self.target(x).detach()) ** 2).mean()


def _train(rank, world, stage, persistence=None):
    import deepspeed

    model = Twin()
    initial = [p.detach().clone() for p in model.target.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if persistence is not None:  # 0: every parameter partitioned, none kept whole
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, config=config, dist_init_required=False
    )
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        loss = engine(torch.randn(4, 6, generator=g))
        engine.backward(loss)
        engine.step()
        ema_update(engine.module.target, engine.module.online, momentum_at(step, STEPS, 0.5))
    params = list(engine.module.target.parameters()) + list(engine.module.online.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        target = [p.detach().clone() for p in engine.module.target.parameters()]
        online = [p.detach().clone() for p in engine.module.online.parameters()]
    return target, online, initial


@pytest.fixture(scope="module")
def by_stage():
    runs = {stage: run_ranks(_train, 2, stage) for stage in (0, 2, 3)}
    runs["3-partitioned"] = run_ranks(_train, 2, 3, 0)
    return runs


@pytest.mark.parametrize("stage", [2, 3, "3-partitioned"])
def test_same_momentum_weights_as_zero0(by_stage, stage):
    ref_target, ref_online, initial = by_stage[0][0]
    for rank in range(2):
        target, online, _ = by_stage[stage][rank]
        for a, b in zip(target, ref_target, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(online, ref_online, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # The target moved, and it is not the online network: the update really ran.
    assert max((a - b).abs().max() for a, b in zip(ref_target, initial, strict=True)) > 1e-3
    assert max((a - b).abs().max() for a, b in zip(ref_target, ref_online, strict=True)) > 1e-4


def test_momentum_schedule():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.9) == pytest.approx(0.95)


def test_ema_step_by_hand():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [
        0.9 * t.detach() + 0.1 * o.detach()
        for t, o in zip(target.parameters(), online.parameters(), strict=True)
    ]
    ema_update(target, online, 0.9)
    for p, e in zip(target.parameters(), expected, strict=True):
        assert torch.allclose(p, e)
