"""Cached accumulation (GradCache): A micro-batches of b give the loss and gradients of one batch
of A x b, on one process and across ranks; dropout is replayed; a learnable temperature gets its
gradient once."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_contrast.losses import nt_xent
from dist_contrast.methods import LossOutput, Method, build_method
from dist_contrast.train.accumulate import cached_step, plain_step, split_batch

from conftest import config_from_dict
from multiproc import run_ranks


class TorchEngine:
    """DeepSpeed's interface on plain torch: backward divides by the accumulation steps."""

    def __init__(self, module: nn.Module, parts: int) -> None:
        self.module, self.parts = module, parts

    def __call__(self, batch, **kw):
        return self.module(batch, **kw)

    def backward(self, loss):
        (loss / self.parts).backward()

    def step(self):
        pass


def _simclr():
    torch.manual_seed(0)
    cfg = config_from_dict(
        {
            "model": {"width": 4, "proj_hidden_dim": 16, "proj_dim": 8},
            "data": {"image_size": 8},
            "loss": {"temperature": 0.3},
        }
    )
    return build_method(cfg).double()


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64),
        "view2": torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64),
    }


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-9):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=tol, atol=1e-12), k


def test_cached_equals_one_big_batch():
    ref = _simclr()
    ref_loss = ref(_batch(16)).loss
    ref_loss.backward()
    m = _simclr()
    out = cached_step(TorchEngine(m, 4), _batch(16), 4)
    assert float(out.loss) == pytest.approx(float(ref_loss), rel=1e-12)
    _close(_grads(m), _grads(ref))


def test_plain_accumulation_sees_fewer_negatives():
    ref = _simclr()
    ref(_batch(16)).loss.backward()
    m = _simclr()
    plain_step(TorchEngine(m, 4), _batch(16), 4)
    g, r = _grads(m), _grads(ref)
    assert max(float((g[k] - r[k]).abs().max()) for k in g) > 1e-6


def _rank(rank, world):
    m = _simclr()
    full = _batch(16 * world)
    mine = {k: v[rank * 16 : (rank + 1) * 16] for k, v in full.items()}
    out = cached_step(TorchEngine(m, 4), mine, 4)
    for p in m.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    return float(out.loss), _grads(m)


def test_cached_across_two_ranks_equals_one_process():
    ref = _simclr()
    ref_loss = ref(_batch(32)).loss
    ref_loss.backward()
    results = run_ranks(_rank, 2)
    assert sum(r[0] for r in results) / 2 == pytest.approx(float(ref_loss), rel=1e-12)
    for _, grads in results:
        _close(grads, _grads(ref))


class DropoutTemp(Method):
    """An encoder with dropout and a learnable temperature in the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 12), nn.Dropout(0.3), nn.Linear(12, 4))
        self.log_t = nn.Parameter(torch.tensor(math.log(0.5)))

    def embed(self, batch):
        z = self.encoder(torch.cat([batch["a"], batch["b"]]))
        z1, z2 = z.chunk(2)
        return {"z1": z1, "z2": z2}

    def loss(self, emb, batch):
        return LossOutput(nt_xent(emb["z1"], emb["z2"], self.log_t.exp()))

    def loss_parameters(self):
        return [self.log_t]


def _ab(n):
    g = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(n, 5, generator=g, dtype=torch.float64),
    }


def test_dropout_replayed_and_temperature_counted_once():
    # Reference: the same micro-batch forwards in the same RNG order, one loss on all of them.
    ref = DropoutTemp().double()
    torch.manual_seed(42)
    embs = [ref.embed(mb) for mb in split_batch(_ab(12), 3)]
    cat = {k: torch.cat([e[k] for e in embs]) for k in embs[0]}
    ref.loss(cat, None).loss.backward()

    m = DropoutTemp().double()
    torch.manual_seed(42)
    cached_step(TorchEngine(m, 3), _ab(12), 3)
    _close(_grads(m), _grads(ref))
    assert m.log_t.grad is not None and abs(float(m.log_t.grad)) > 1e-6


def test_split_batch_checks_divisibility():
    with pytest.raises(ValueError, match="does not split into 3"):
        split_batch({"x": torch.zeros(8)}, 3)
