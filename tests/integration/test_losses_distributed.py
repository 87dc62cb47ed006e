"""W ranks (gloo) == one process on the global batch, for every objective, W in {1, 2, 4}.

Convention checked: the mean over ranks of the per-rank losses equals the single-process loss
on the concatenated batch; each rank's input gradient divided by W (DeepSpeed's average) equals
its slice of the single-process input gradient; gradients of shared tensors (logit scale and
bias, a queue of negatives) averaged over ranks equal the single-process ones. One spawn per W
runs every objective. Objectives whose per-rank loss is a global-count share (everything that
gathers) are also checked with uneven per-rank batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from dist_contrast import losses as L

from multiproc import run_ranks

B = 8
F64 = torch.float64


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    return {
        # classes spread over ranks; label 3 has a single sample (an anchor without positive)
        "x": r(B, 5),
        "labels": torch.tensor([0, 1, 2, 0, 1, 3, 2, 0]),
        "z1": r(B, 5),
        "z2": r(B, 5),
        "views": r(B, 3, 5),
        "image": r(B, 5),
        "text": r(B, 5),
        "logit_scale": torch.tensor(math.log(1 / 0.2), dtype=F64),
        "sig_scale": torch.tensor(math.log(10.0), dtype=F64),
        "sig_bias": torch.tensor(-2.0, dtype=F64),
        "q": r(B, 5),
        "k": r(B, 5),
        "queue": r(6, 5),
        "feat": r(B, 5),
        "bank_pos": r(B, 5),
        "bank_neg": r(B, 6, 5),
        "p1": r(B, 5),
        "p2": r(B, 5),
    }


@dataclass(frozen=True)
class Objective:
    fn: Callable[..., torch.Tensor]  # fn(*batch, *shared, gather=...)
    batch: tuple[str, ...]  # inputs sliced by rank
    shared: tuple[str, ...] = ()  # inputs every rank holds whole
    gathered: bool = True  # global-count share: exact with uneven batches too (not byol)


OBJECTIVES: dict[str, Objective] = {
    "contrastive": Objective(
        lambda x, y, gather: L.contrastive_loss(x, y, 0.2, 1.1, gather), ("x", "labels")
    ),
    "triplet_all": Objective(
        lambda x, y, gather: L.triplet_loss(x, y, 0.3, "all", None, gather), ("x", "labels")
    ),
    "triplet_batch_hard": Objective(
        lambda x, y, gather: L.triplet_loss(x, y, 0.3, "batch-hard", None, gather),
        ("x", "labels"),
    ),
    "triplet_semi_hard": Objective(
        lambda x, y, gather: L.triplet_loss(x, y, 0.3, "semi-hard", 0.5, gather), ("x", "labels")
    ),
    "npair": Objective(lambda x, y, gather: L.n_pair_loss(x, y, gather), ("x", "labels")),
    "angular": Objective(lambda x, y, gather: L.angular_loss(x, y, 40, gather), ("x", "labels")),
    "ntxent": Objective(lambda a, b, gather: L.nt_xent(a, b, 0.3, gather), ("z1", "z2")),
    "dcl": Objective(lambda a, b, gather: L.dcl_loss(a, b, 0.3, None, gather), ("z1", "z2")),
    "dclw": Objective(lambda a, b, gather: L.dcl_loss(a, b, 0.3, 0.5, gather), ("z1", "z2")),
    "infonce_in_batch": Objective(
        lambda q, k, gather: L.info_nce(q, k, None, 0.2, gather, in_batch=True), ("q", "k")
    ),
    "infonce_in_batch_queue": Objective(
        lambda q, k, n, gather: L.info_nce(q, k, n, 0.2, gather, in_batch=True),
        ("q", "k"),
        ("queue",),
    ),
    "infonce_queue": Objective(
        lambda q, k, n, gather: L.info_nce(q, k, n, 0.2, gather, in_batch=False),
        ("q", "k"),
        ("queue",),
    ),
    "supcon_labels": Objective(
        lambda f, y, gather: L.supcon_loss(f, y, 0.2, 0.1, "all", gather), ("views", "labels")
    ),
    "supcon_simclr": Objective(
        lambda f, gather: L.supcon_loss(f, None, 0.2, 0.1, "all", gather), ("views",)
    ),
    "supcon_one": Objective(
        lambda f, y, gather: L.supcon_loss(f, y, 0.2, 0.2, "one", gather), ("views", "labels")
    ),
    "clip": Objective(
        lambda i, t, s, gather: L.clip_loss(i, t, s, 100.0, gather),
        ("image", "text"),
        ("logit_scale",),
    ),
    "siglip": Objective(
        lambda i, t, s, b, gather: L.siglip_loss(i, t, s, b, gather),
        ("image", "text"),
        ("sig_scale", "sig_bias"),
    ),
    "nce_estimated_z": Objective(
        lambda f, p, n, gather: L.nce_loss(f, p, n, 0.2, "nce", 100, None, gather),
        ("feat", "bank_pos", "bank_neg"),
    ),
    "nce_shared_negatives": Objective(
        lambda f, p, n, gather: L.nce_loss(f, p, n, 0.2, "nce", 100, 30.0, gather),
        ("feat", "bank_pos"),
        ("queue",),
    ),
    "nce_softmax": Objective(
        lambda f, p, n, gather: L.nce_loss(f, p, n, 0.2, "softmax", None, None, gather),
        ("feat", "bank_pos", "bank_neg"),
    ),
    "byol": Objective(
        lambda p1, z2, p2, z1, gather: L.byol_loss(p1, z2, p2, z1),
        ("p1", "z2", "p2", "z1"),
        gathered=False,
    ),
}


def evaluate(name: str, rows: slice, gather: str = "all"):
    """Loss, gradients of the batch inputs and of the shared inputs, for ``rows``."""
    spec = OBJECTIVES[name]
    inputs = make_inputs()
    batch = [inputs[k][rows].clone() for k in spec.batch]
    shared = [inputs[k].clone() for k in spec.shared]
    leaves = [t.requires_grad_(True) for t in batch + shared if t.is_floating_point()]
    loss = spec.fn(*batch, *shared, gather=gather)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    n_batch = sum(t.is_floating_point() for t in batch)
    return float(loss.detach()), grads[:n_batch], grads[n_batch:]


def _rank(rank: int, world: int, cases: list[tuple[str, tuple[int, ...], str]]):
    """Every case on this rank, in the same order on every rank (collectives)."""
    out = []
    for name, sizes, gather in cases:
        start = sum(sizes[:rank])
        out.append(evaluate(name, slice(start, start + sizes[rank]), gather))
    return out


def _check_equivalence(name, sizes, per_rank):
    world = len(sizes)
    ref_loss, ref_batch, ref_shared = evaluate(name, slice(None))
    mean_loss = sum(r[0] for r in per_rank) / world
    assert mean_loss == pytest.approx(ref_loss, rel=1e-10, abs=1e-12), name
    assert abs(ref_loss) > 1e-3, f"{name}: a zero loss checks nothing"
    for rank, (_, batch_grads, _) in enumerate(per_rank):
        start = sum(sizes[:rank])
        for got, ref in zip(batch_grads, ref_batch, strict=True):
            want = ref[start : start + sizes[rank]]
            assert torch.allclose(got / world, want, rtol=1e-9, atol=1e-12), (name, rank)
    for i, ref in enumerate(ref_shared):
        mean = sum(r[2][i] for r in per_rank) / world
        assert torch.allclose(mean, ref, rtol=1e-9, atol=1e-12), (name, "shared", i)
    nonzero = [g for g in ref_batch if g.abs().sum() > 0]
    assert nonzero, f"{name}: no input gradient checks nothing"


def _even(world):
    return (B // world,) * world


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_equal_one_process_every_objective(world):
    names = list(OBJECTIVES)
    cases = [(n, _even(world), "all") for n in names]
    if world == 4:
        cases += [(n, (3, 1, 2, 2), "all") for n in names if OBJECTIVES[n].gathered]
    if world == 2:
        cases += [(n, _even(world), "off") for n in names]
        # 3 / 5 rows (the 6 / 10 of the field report): ranks must weight samples, not ranks
        cases += [(n, (3, 5), "all") for n in names if OBJECTIVES[n].gathered]
    results = run_ranks(_rank, world, cases)
    for i, (name, sizes, gather) in enumerate(cases):
        per_rank = [results[r][i] for r in range(world)]
        if gather == "all":
            _check_equivalence(name, sizes, per_rank)
        else:
            _check_local(name, sizes, per_rank)


def _check_local(name, sizes, per_rank):
    """gather "off": each rank's loss is the single-process loss of its own rows."""
    for rank, (loss, batch_grads, _) in enumerate(per_rank):
        start = sum(sizes[:rank])
        ref_loss, ref_batch, _ = evaluate(name, slice(start, start + sizes[rank]))
        assert loss == pytest.approx(ref_loss, rel=1e-10, abs=1e-12), (name, rank)
        for got, ref in zip(batch_grads, ref_batch, strict=True):
            assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12), (name, rank)
