"""W ranks with gathered negatives == one process on the global batch (loss and encoder
gradients), for the SimCLR method as the engine trains it."""

import pytest
import torch
import torch.distributed as dist

from dist_contrast.methods import build_method

from conftest import config_from_dict
from multiproc import run_ranks

GLOBAL_B = 12


def _tiny_cfg(gather="all", memory_efficient=False):
    loss = {"gather": gather, "temperature": 0.3, "memory_efficient": memory_efficient, "tile": 5}
    return config_from_dict(
        {
            "model": {"width": 4, "proj_hidden_dim": 16, "proj_dim": 8},
            "data": {"image_size": 8},
            "loss": loss,
        }
    )


def _inputs():
    g = torch.Generator().manual_seed(1)
    v1 = torch.randn(GLOBAL_B, 1, 8, 8, generator=g, dtype=torch.float64)
    v2 = torch.randn(GLOBAL_B, 1, 8, 8, generator=g, dtype=torch.float64)
    return v1, v2


def _method(memory_efficient=False):
    torch.manual_seed(0)
    return build_method(_tiny_cfg(memory_efficient=memory_efficient)).double()


def _reference():
    method = _method()
    v1, v2 = _inputs()
    loss = method({"view1": v1, "view2": v2}).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in method.named_parameters()}


def _rank_step(rank, world, memory_efficient=False):
    method = _method(memory_efficient)
    v1, v2 = _inputs()
    per = GLOBAL_B // world
    sl = slice(rank * per, (rank + 1) * per)
    loss = method({"view1": v1[sl], "view2": v2[sl]}).loss
    loss.backward()
    # What DeepSpeed does with gradients: average over ranks.
    for p in method.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return float(mean_loss) / world, {n: p.grad.clone() for n, p in method.named_parameters()}


@pytest.mark.parametrize("world, tiled", [(2, False), (4, False), (2, True)])
def test_ranks_equal_one_process(world, tiled):
    """Also with the tiled softmax (loss.memory_efficient) against the full one-process loss."""
    ref_loss, ref_grads = _reference()
    for loss, grads in run_ranks(_rank_step, world, tiled):
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-9, atol=1e-12), name


def _rank_step_local(rank, world):
    torch.manual_seed(0)
    method = build_method(_tiny_cfg(gather="off")).double()
    v1, v2 = _inputs()
    per = GLOBAL_B // world
    sl = slice(rank * per, (rank + 1) * per)
    return float(method({"view1": v1[sl], "view2": v2[sl]}).loss)


def test_gather_off_is_local_and_differs():
    """Without the gather each rank sees fewer negatives, so the loss is not the global one:
    the equivalence above is not an accident of the data."""
    ref_loss, _ = _reference()
    losses = run_ranks(_rank_step_local, 2)
    assert abs(sum(losses) / 2 - ref_loss) > 1e-3
