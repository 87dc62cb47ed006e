"""The sharded memory bank: W ranks with bank shards give the loss and gradients of one process
with the whole bank and the same sampled negatives (float64, against losses.nce_loss, softmax
and NCE, with proximal term); the momentum update reaches the owners; checkpoint state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_contrast.losses import estimate_nce_z, nce_loss
from dist_contrast.negatives import MemoryBank, bank_loss, estimate_bank_z

from multiproc import run_ranks

N_DATA, D, T, M = 23, 5, 0.1, 0.5


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (with a repeat) and features of a global batch of n."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(N_DATA, generator=g)[:n]
    idx[-1] = idx[0]  # a sample twice in the global batch
    return idx, torch.randn(n, D, generator=g, dtype=torch.float64)


def _full_bank() -> torch.Tensor:
    return MemoryBank(N_DATA, D, world=1, rank=0, dtype=torch.float64).rows.clone()


def _naive_update(bank: torch.Tensor, idx: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    bank = bank.clone()
    last = {int(i): f for i, f in zip(idx, feats, strict=True)}  # the last occurrence wins
    for i, f in last.items():
        bank[i] = F.normalize(M * bank[i] + (1 - M) * F.normalize(f, dim=0), dim=0)
    return bank


def _reference(feats, positives, negatives, mode, z, proximal):
    loss = nce_loss(feats, positives, negatives, T, mode, N_DATA, z, gather_mode="off")
    if proximal:
        f = F.normalize(feats, dim=1)
        loss = loss + proximal * (f - positives).pow(2).sum(dim=1).mean()
    return loss


# --------------------------------------------------------------------------------------------
# One process


def test_initial_shards_interleave_to_the_one_process_bank():
    full = _full_bank()
    assert full.shape == (N_DATA, D)
    assert torch.allclose(full.norm(dim=1), torch.ones(N_DATA, dtype=torch.float64))
    for world in (2, 3, 4):
        for rank in range(world):
            bank = MemoryBank(N_DATA, D, world=world, rank=rank, dtype=torch.float64)
            assert torch.equal(bank.rows, full[rank::world])
    assert MemoryBank(N_DATA, D, world=1, rank=0).rows.dtype == torch.float32


def test_one_process_update_and_fetch_against_a_loop():
    bank = MemoryBank(N_DATA, D, world=1, rank=0, momentum=M, dtype=torch.float64)
    idx, feats = _inputs(8, 1)
    want = _naive_update(bank.rows, idx, feats)
    bank.update(idx, feats)
    assert torch.allclose(bank.rows, want, rtol=1e-12, atol=1e-15)
    assert torch.equal(bank.fetch(idx), bank.rows[idx])
    with pytest.raises(ValueError, match="sample index 23 outside"):
        bank.fetch(torch.tensor([0, 23]))
    with pytest.raises(ValueError, match=r"features must have shape \[2, 5\]"):
        bank.update(torch.tensor([0, 1]), torch.randn(3, D))


@pytest.mark.parametrize("mode", ["softmax", "nce"])
def test_one_process_bank_loss_is_nce_loss(mode):
    bank = MemoryBank(N_DATA, D, world=1, rank=0, dtype=torch.float64, tile=3)
    idx, feats = _inputs(6, 2)
    feats.requires_grad_(True)
    positives = bank.fetch(idx)
    negatives = bank.sample_negatives(7)
    for z, proximal in ((None, 0.0), (40.0, 0.3)):
        got = bank_loss(
            feats, positives, negatives, T, mode=mode, n_data=N_DATA, z=z, proximal=proximal
        )
        want = _reference(feats, positives, negatives, mode, z, proximal)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
        (g1,) = torch.autograd.grad(got, feats)
        (g2,) = torch.autograd.grad(want, feats)
        assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-13)
    z = estimate_bank_z(feats, positives, negatives, T, N_DATA)
    assert z == pytest.approx(estimate_nce_z(feats, positives, negatives, T, N_DATA), rel=1e-12)


def test_loss_method_estimates_z_once_and_keeps_it():
    bank = MemoryBank(N_DATA, D, world=1, rank=0, dtype=torch.float64, seed=3)
    idx, feats = _inputs(6, 3)
    gen_state = bank.generator.get_state()
    loss = bank.loss(feats, idx, 7, mode="nce", temperature=T)
    bank.generator.set_state(gen_state)
    negatives = bank.sample_negatives(7)
    z = estimate_nce_z(feats, bank.fetch(idx), negatives, T, N_DATA)
    assert float(bank.z) == pytest.approx(z, rel=1e-12)
    want = nce_loss(feats, bank.fetch(idx), negatives, T, "nce", N_DATA, z)
    assert float(loss) == pytest.approx(float(want), rel=1e-10)
    bank.loss(feats * 3, idx, 7, mode="nce", temperature=T)
    assert float(bank.z) == pytest.approx(z, rel=1e-12)  # kept, not estimated again


def test_shard_state_round_trip_and_not_in_module_state_dict():
    bank = MemoryBank(N_DATA, D, world=2, rank=1)
    bank.z.fill_(12.5)
    bank.sample_negatives(4)
    state = bank.shard_state_dict()
    assert dict(bank.state_dict()) == {}
    fresh = MemoryBank(N_DATA, D, world=2, rank=1, seed=9)
    fresh.load_shard_state_dict(state)
    assert torch.equal(fresh.rows, bank.rows) and float(fresh.z) == 12.5
    assert torch.equal(fresh.sample_negatives(6), bank.sample_negatives(6))  # same draws next
    with pytest.raises(ValueError, match="'world': 2"):
        MemoryBank(N_DATA, D, world=4, rank=1).load_shard_state_dict(state)
    with pytest.raises(ValueError, match="'n_data': 23"):
        MemoryBank(N_DATA + 1, D, world=2, rank=1).load_shard_state_dict(state)
    torch.nn.Sequential(bank).half()
    assert bank.rows.dtype == torch.float32 and bank.z.dtype == torch.float64


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(N_DATA, D, world=1, rank=0, momentum=1.0)
    with pytest.raises(ValueError, match="n_data"):
        MemoryBank(3, D, world=4, rank=0)
    f = torch.randn(2, D)
    with pytest.raises(ValueError, match="mode"):
        bank_loss(f, f, f, mode="nope")
    with pytest.raises(ValueError, match="n_data"):
        bank_loss(f, f, f, mode="nce")
    with pytest.raises(ValueError, match=r"negatives must have shape \[k, 5\]"):
        bank_loss(f, f, torch.randn(3, D + 1), mode="softmax")
    with pytest.raises(ValueError, match="proximal"):
        bank_loss(f, f, f, mode="softmax", proximal=-1.0)


# --------------------------------------------------------------------------------------------
# W ranks against one process

CASES = [("softmax", None, 0.0), ("softmax", None, 0.3), ("nce", None, 0.0), ("nce", 40.0, 0.3)]


def _rank_bank(rank: int, world: int, sizes: tuple[int, ...], tile: int | None):
    bank = MemoryBank(N_DATA, D, momentum=M, dtype=torch.float64, tile=tile)
    assert (bank.world, bank.rank) == (world, rank)
    idx_all, feats_all = _inputs(sum(sizes), 5)
    start = sum(sizes[:rank])
    idx = idx_all[start : start + sizes[rank]]
    feats = feats_all[start : start + sizes[rank]].clone().requires_grad_(True)
    positives = bank.fetch(idx)
    negatives = bank.sample_negatives(3 + rank)  # ranks may sample different numbers
    out = []
    for mode, z, proximal in CASES:
        loss = bank_loss(
            feats, positives, negatives, T, mode=mode, n_data=N_DATA, z=z, proximal=proximal
        )
        (grad,) = torch.autograd.grad(loss, feats)
        out.append((float(loss.detach()), grad))
    z = estimate_bank_z(feats, positives, negatives, T, N_DATA)
    bank.update(idx, feats)
    return positives, negatives, out, z, bank.rows.clone()


def _check_bank(world, sizes, results):
    idx, feats = _inputs(sum(sizes), 5)
    full = _full_bank()
    positives = torch.cat([r[0] for r in results])
    assert torch.equal(positives, full[idx])  # fetched from the owners
    negatives = torch.cat([r[1] for r in results])  # negatives_0 || ... || negatives_{W-1}
    feats.requires_grad_(True)
    for i, (mode, z, proximal) in enumerate(CASES):
        want = _reference(feats, positives, negatives, mode, z, proximal)
        (want_g,) = torch.autograd.grad(want, feats)
        got = sum(r[2][i][0] for r in results) / world
        assert got == pytest.approx(float(want.detach()), rel=1e-11), (mode, z, proximal)
        for rank, r in enumerate(results):
            start = sum(sizes[:rank])
            ref = want_g[start : start + sizes[rank]]
            assert torch.allclose(r[2][i][1] / world, ref, rtol=1e-9, atol=1e-13), (mode, rank)
    z = estimate_nce_z(feats, positives, negatives, T, N_DATA)
    assert all(r[3] == pytest.approx(z, rel=1e-12) for r in results)
    updated = _naive_update(full, idx, feats.detach())
    assert not torch.allclose(updated, full)
    for rank, r in enumerate(results):
        assert torch.allclose(r[4], updated[rank::world], rtol=1e-12, atol=1e-15), rank


@pytest.mark.parametrize(
    "world, sizes, tile", [(1, (6,), None), (2, (4, 3), 2), (4, (2, 1, 3, 2), 2)]
)
def test_ranks_equal_one_process_with_the_whole_bank(world, sizes, tile):
    _check_bank(world, sizes, run_ranks(_rank_bank, world, sizes, tile))


# --------------------------------------------------------------------------------------------
# The whole bank as negatives (method.bank_negatives=0): InstDisc's softmax over all n rows


def _naive_whole_bank_softmax(feats: torch.Tensor, idx: torch.Tensor, bank: torch.Tensor):
    """mean_i -log( exp(v_{idx_i} . f_i / T) / sum_j exp(v_j . f_i / T) ), j over all n rows."""
    total = feats.new_zeros(())
    for f, i in zip(F.normalize(feats, dim=1), idx, strict=True):
        denominator = sum((v @ f / T).exp() for v in bank)
        total = total - (bank[i] @ f / T - denominator.log())
    return total / len(idx)


def _rank_whole_bank(rank: int, world: int, sizes: tuple[int, ...]):
    bank = MemoryBank(N_DATA, D, dtype=torch.float64)
    idx_all, feats_all = _inputs(sum(sizes), 7)
    start = sum(sizes[:rank])
    idx, feats = idx_all[start : start + sizes[rank]], feats_all[start : start + sizes[rank]]
    feats = feats.clone().requires_grad_(True)
    loss = bank_loss(feats, bank.fetch(idx), bank.rows, T, mode="softmax", whole_bank=True)
    (grad,) = torch.autograd.grad(loss, feats)
    return float(loss.detach()), grad


@pytest.mark.parametrize("world, sizes", [(1, (6,)), (2, (4, 3))])
def test_whole_bank_softmax_counts_each_row_once(world, sizes):
    idx, feats = _inputs(sum(sizes), 7)
    feats.requires_grad_(True)
    want = _naive_whole_bank_softmax(feats, idx, _full_bank())
    (want_g,) = torch.autograd.grad(want, feats)
    results = run_ranks(_rank_whole_bank, world, sizes)
    assert sum(r[0] for r in results) / world == pytest.approx(float(want), rel=1e-11)
    got_g = torch.cat([r[1] for r in results]) / world
    assert torch.allclose(got_g, want_g, rtol=1e-9, atol=1e-13)
