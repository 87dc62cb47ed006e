"""LARS and LAMB against naive per-parameter float64 references; build_optimizer's groups."""

import math

import pytest
import torch
from torch import nn

from dist_contrast.train.optim import LAMB, LARS, build_optimizer, param_groups

from conftest import closed_form_lr, config_from_dict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()


def _grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]


def _norm(t: list[float]) -> float:
    return math.sqrt(sum(x * x for x in t))


def _lars_ref(w, g, buf, lr, wd, adapt, eta=1e-3, momentum=0.9):
    """One LARS step of one parameter, element by element on Python floats."""
    d = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
    wn, dn = _norm(w), _norm(d)
    trust = eta * wn / dn if adapt and wn > 0 and dn > 0 else 1.0
    buf = [momentum * b + lr * trust * di for b, di in zip(buf, d, strict=True)]
    return [wi - b for wi, b in zip(w, buf, strict=True)], buf


def _lamb_ref(w, g, m, v, t, lr, wd, adapt, b1=0.9, b2=0.999, eps=1e-6):
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
    u = [
        (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * wi
        for mi, vi, wi in zip(m, v, w, strict=True)
    ]
    wn, un = _norm(w), _norm(u)
    trust = wn / un if adapt and wn > 0 and un > 0 else 1.0
    return [wi - lr * trust * ui for wi, ui in zip(w, u, strict=True)], m, v


def _run(opt_cls, steps=4, lr=0.5, wd=0.1, **kw):
    model = _model()
    start = [p.detach().flatten().tolist() for p in model.parameters()]
    opt = opt_cls(param_groups(model, wd), lr=lr, **kw)
    for s in range(steps):
        for p, g in zip(model.parameters(), _grads(model, s), strict=True):
            p.grad = g
        opt.step()
    return model, start


def test_lars_equals_reference():
    model, start = _run(LARS)
    for i, p in enumerate(model.parameters()):
        adapt = p.ndim > 1
        w, buf = start[i], [0.0] * p.numel()
        for s in range(4):
            g = _grads(model, s)[i].flatten().tolist()
            w, buf = _lars_ref(w, g, buf, lr=0.5, wd=0.1 if adapt else 0.0, adapt=adapt)
        assert torch.allclose(
            p.detach().flatten(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-14
        ), i


def test_lamb_equals_reference():
    model, start = _run(LAMB, lr=0.05)
    for i, p in enumerate(model.parameters()):
        adapt = p.ndim > 1
        w, m, v = start[i], [0.0] * p.numel(), [0.0] * p.numel()
        for s in range(4):
            g = _grads(model, s)[i].flatten().tolist()
            w, m, v = _lamb_ref(w, g, m, v, s + 1, lr=0.05, wd=0.1 if adapt else 0.0, adapt=adapt)
        assert torch.allclose(
            p.detach().flatten(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-14
        ), i


def test_parameter_without_grad_is_left_alone():
    model = _model()
    opt = LAMB(param_groups(model, 0.1), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars", "lamb"])
def test_build_optimizer_groups(name):
    cfg = config_from_dict(
        {"train": {"optimizer": name, "weight_decay": 0.1}, "deepspeed": {"zero_stage": 0}}
    )
    opt = build_optimizer(_model(), cfg.train)
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="LARS"):
        LARS(_model().parameters(), lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="LAMB"):
        LAMB(_model().parameters(), lr=0.1, eps=0.0)


# (warmup, total, min_lr_ratio): no warm-up, one step of each phase, a warm-up as long as the
# run and one longer than it (every step of those in warm-up); floors of 0, 0.01, 0.1, 0.5
SCHEDULES = [(0, 10, 0.01), (2, 6, 0.01), (1, 2, 0.0), (3, 20, 0.5), (7, 7, 0.01), (9, 4, 0.1)]


@pytest.mark.parametrize("warmup,total,floor", SCHEDULES)
def test_warmup_cosine_matches_the_closed_form(warmup, total, floor):
    from dist_contrast.train.setup import warmup_cosine

    cfg = config_from_dict(
        {"train": {"steps": total, "warmup_steps": warmup, "min_lr_ratio": floor, "lr": 1.0}}
    )
    factor = warmup_cosine(cfg.train)
    steps = range(total + 3) if total > warmup else range(total)
    got = [factor(s) for s in steps]
    assert got == pytest.approx([closed_form_lr(s, 1.0, warmup, total, floor) for s in steps])
    if total > warmup:
        assert got[total] == pytest.approx(floor) and max(got) == pytest.approx(1.0)
