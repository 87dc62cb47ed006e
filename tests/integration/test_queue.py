"""The sharded MoCo queue: W ranks with shards Q_0..Q_{W-1} give the loss and the gradients of
one process with the queue Q_0 || ... || Q_{W-1} (float64, against losses.info_nce); ring
buffer order, wrap-around, checkpoint state; the distributed log-sum-exp's custom Functions."""

from __future__ import annotations

import pytest
import torch

from dist_contrast.losses import info_nce
from dist_contrast.losses.kernels.dlse import _LogSumExp, _TiledLogSumExp
from dist_contrast.negatives import ShardedQueue, distributed_logsumexp, local_logsumexp

from multiproc import run_ranks

D, K_TOTAL, T = 6, 24, 0.1


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(
        n, D, generator=g, dtype=torch.float64
    )


def _naive_ring(shard: torch.Tensor, ptr: int, batches: list[torch.Tensor]):
    """Write every key, one at a time, at the pointer, wrapping around."""
    shard = shard.clone()
    for batch in batches:
        for row in torch.nn.functional.normalize(batch, dim=1):
            shard[ptr] = row
            ptr = (ptr + 1) % shard.shape[0]
    return shard, ptr


# --------------------------------------------------------------------------------------------
# One process


def test_local_logsumexp_matches_torch_and_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, D, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(7, D, generator=g, dtype=torch.float64)
    full = local_logsumexp(x, keys, T)
    assert torch.allclose(full, torch.logsumexp(x @ keys.T / T, dim=1), rtol=1e-12)
    for tile in (1, 3, 7, 100):  # 3 does not divide 7
        tiled = local_logsumexp(x, keys, T, tile=tile)
        assert torch.allclose(tiled, full, rtol=1e-12)
        w = torch.randn(5, generator=g, dtype=torch.float64)
        (ga,) = torch.autograd.grad((tiled * w).sum(), x)
        (gb,) = torch.autograd.grad((local_logsumexp(x, keys, T) * w).sum(), x)
        assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a: _TiledLogSumExp.apply(a, keys, 1 / T, 3), (x,))
    assert torch.autograd.gradcheck(lambda a: _LogSumExp.apply(a, keys, 1 / T), (x,))
    big = x.detach() * 50  # logits in the thousands: no overflow, no cancellation
    want = torch.logsumexp(big @ keys.T / T, dim=1)
    assert torch.allclose(local_logsumexp(big, keys, T), want, rtol=1e-14)
    assert torch.allclose(local_logsumexp(big, keys, T, tile=2), want, rtol=1e-14)
    with pytest.raises(ValueError, match="tile"):
        local_logsumexp(x, keys, T, tile=0)


def test_one_process_queue_loss_is_info_nce_with_the_queue():
    queue = ShardedQueue(D, K_TOTAL, world=1, rank=0, dtype=torch.float64, tile=5)
    queue.enqueue(_batch(5, 1)[1])
    q, k = _batch(4, 2)
    q.requires_grad_(True)
    loss = queue.info_nce(q, k, T)
    want = info_nce(q, k, queue.keys, T, in_batch=False)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    (got_g,) = torch.autograd.grad(loss, q)
    (want_g,) = torch.autograd.grad(want, q)
    assert torch.allclose(got_g, want_g, rtol=1e-10, atol=1e-13)
    assert queue.negatives_per_query == K_TOTAL
    lse, n_all = distributed_logsumexp(q, queue.keys, T)
    assert n_all == 4 and torch.allclose(lse, torch.logsumexp(q @ queue.keys.T / T, dim=1))


def test_initial_shards_put_together_are_the_one_process_queue():
    full = ShardedQueue(D, K_TOTAL, world=1, rank=0).keys
    for world in (2, 3, 4):
        shards = [ShardedQueue(D, K_TOTAL, world=world, rank=r).keys for r in range(world)]
        assert all(s.shape == (K_TOTAL // world, D) for s in shards)
        assert torch.equal(torch.cat(shards), full)
    assert full.dtype == torch.float32
    assert torch.allclose(full.norm(dim=1), torch.ones(K_TOTAL))
    assert not torch.equal(full, ShardedQueue(D, K_TOTAL, world=1, rank=0, seed=1).keys)
    assert len(set(map(tuple, full.tolist()))) == K_TOTAL


def test_enqueue_wraps_around_in_order():
    queue = ShardedQueue(D, 14, world=2, rank=1, dtype=torch.float64)  # shard of 7
    shard, ptr = queue.keys.clone(), 0
    batches = [_batch(n, 10 + n)[0] for n in (3, 3, 3, 5, 10, 1)]  # 3 does not divide 7; 10 > 7
    for batch in batches:
        queue.enqueue(batch)
        shard, ptr = _naive_ring(shard, ptr, [batch])
        assert queue.ptr == ptr
        assert torch.equal(queue.keys, shard)
    again = ShardedQueue(D, 14, world=2, rank=1, dtype=torch.float64)
    for batch in batches:
        again.enqueue(batch)
    assert torch.equal(again.keys, queue.keys)  # deterministic
    with pytest.raises(ValueError, match=r"\[B, 6\]"):
        queue.enqueue(torch.randn(3, D + 1))


def test_enqueue_detaches_and_stores_fp32_under_autocast():
    queue = ShardedQueue(D, 8, world=1, rank=0)
    keys = torch.randn(3, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        queue.enqueue(keys.bfloat16() * 3)
    assert queue.keys.dtype == torch.float32 and not queue.keys.requires_grad
    assert torch.allclose(queue.keys[:3].norm(dim=1), torch.ones(3), atol=1e-6)
    module = torch.nn.Sequential(queue).bfloat16()  # DeepSpeed's bf16 mode casts the model
    assert queue.keys.dtype == torch.float32
    q, k = torch.randn(2, D).bfloat16(), torch.randn(2, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module[0].info_nce(q, k)
    assert loss.dtype == torch.float32


def test_sharded_queue_holds_the_keys_of_one_process_queue():
    """After enough steps the W shards hold, as a set, the keys a one-process queue of the same
    K_total holds after the same global batches (when B divides K_shard)."""
    world, b, steps = 2, 3, 7
    shards = [ShardedQueue(D, K_TOTAL, world=world, rank=r, dtype=torch.float64) for r in (0, 1)]
    one = ShardedQueue(D, K_TOTAL, world=1, rank=0, dtype=torch.float64)
    for step in range(steps):
        keys = _batch(world * b, 100 + step)[1]
        one.enqueue(keys)
        for r, shard in enumerate(shards):
            shard.enqueue(keys[r * b : (r + 1) * b])
    rows = sorted(map(tuple, torch.cat([s.keys for s in shards]).tolist()))
    assert rows == sorted(map(tuple, one.keys.tolist()))


def test_shard_state_round_trip_and_not_in_module_state_dict():
    queue = ShardedQueue(D, 12, world=2, rank=1)
    queue.enqueue(torch.randn(4, D))
    state = queue.shard_state_dict()
    assert state["ptr"] == 4 and dict(queue.state_dict()) == {}
    fresh = ShardedQueue(D, 12, world=2, rank=1, seed=5)
    fresh.load_shard_state_dict(state)
    assert torch.equal(fresh.keys, queue.keys) and fresh.ptr == queue.ptr
    more = torch.randn(5, D)
    queue.enqueue(more)
    fresh.enqueue(more)
    assert torch.equal(fresh.keys, queue.keys) and fresh.ptr == queue.ptr == 3
    with pytest.raises(ValueError, match="'world': 2"):
        ShardedQueue(D, 12, world=3, rank=1).load_shard_state_dict(state)
    with pytest.raises(ValueError, match="'rank': 1"):
        ShardedQueue(D, 12, world=2, rank=0).load_shard_state_dict(state)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the number of ranks 4"):
        ShardedQueue(D, 10, world=4, rank=0)
    with pytest.raises(ValueError, match="rank must be < world"):
        ShardedQueue(D, 8, world=2, rank=2)
    with pytest.raises(ValueError, match="size must be an int"):
        ShardedQueue(D, 0, world=1, rank=0)
    queue = ShardedQueue(D, 8, world=1, rank=0)
    with pytest.raises(ValueError, match="temperature"):
        queue.info_nce(torch.randn(2, D), torch.randn(2, D), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        queue.info_nce(torch.randn(2, D), torch.randn(3, D))


# --------------------------------------------------------------------------------------------
# W ranks against one process


def _rank_queue(rank: int, world: int, sizes: tuple[int, ...], tile: int | None, seed: int):
    """This rank's queue after one enqueue of its own keys, then its loss and gradient."""
    queue = ShardedQueue(D, K_TOTAL, dtype=torch.float64, tile=tile, seed=seed)
    assert (queue.world, queue.rank) == (world, rank)
    queue.enqueue(_batch(5, 50 + rank)[1])  # 5 does not divide K_shard
    q_all, k_all = _batch(sum(sizes), seed)
    start = sum(sizes[:rank])
    q = q_all[start : start + sizes[rank]].clone().requires_grad_(True)
    k = k_all[start : start + sizes[rank]]
    loss = queue.info_nce(q, k, T)
    (grad,) = torch.autograd.grad(loss, q)
    return float(loss.detach()), grad, queue.keys.clone()


def _rank_cases(rank: int, world: int, cases):
    return [_rank_queue(rank, world, sizes, tile, 7 + i) for i, (sizes, tile) in enumerate(cases)]


def _check_against_one_process(sizes, results, seed):
    world = len(sizes)
    queue = torch.cat([r[2] for r in results])  # Q_0 || ... || Q_{W-1}
    assert queue.shape == (K_TOTAL, D)
    q, k = _batch(sum(sizes), seed)
    q.requires_grad_(True)
    want = info_nce(q, k, queue, T, in_batch=False)
    (want_g,) = torch.autograd.grad(want, q)
    got = sum(r[0] for r in results) / world
    assert got == pytest.approx(float(want.detach()), rel=1e-11)
    for rank, (_, grad, _) in enumerate(results):
        start = sum(sizes[:rank])
        ref = want_g[start : start + sizes[rank]]
        assert torch.allclose(grad / world, ref, rtol=1e-9, atol=1e-13), (sizes, rank)
    assert want_g.abs().sum() > 0


@pytest.mark.parametrize(
    "world, cases",
    [
        (1, [((4,), None)]),
        (2, [((3, 3), None), ((3, 3), 5), ((4, 1), 7)]),
        (4, [((2, 2, 2, 2), None), ((3, 1, 2, 2), 4)]),
    ],
)
def test_ranks_equal_one_process_on_the_concatenated_queue(world, cases):
    """Equal and unequal batches per rank, with and without tiles; one spawn per W."""
    results = run_ranks(_rank_cases, world, cases)
    for i, (sizes, _) in enumerate(cases):
        _check_against_one_process(sizes, [r[i] for r in results], 7 + i)


def test_quick_bench_writes_its_table(tmp_path, capsys):
    """``dist-contrast bench negatives_queue`` runs (2 gloo ranks, tiny sizes) and writes JSON;
    no timing is asserted."""
    import json

    from dist_contrast_bench import negatives_queue as bench

    out = tmp_path / "q.json"
    argv = ["--quick", "--worlds", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["W"] == 2 and row["negatives_per_query"] == 2 * row["K_shard"]
    assert row["queue_bytes_replicated"] == 2 * row["queue_bytes_sharded"] == 2 * 1024 * 32 * 4
    assert row["ms_sharded"] > 0 and row["ms_replicated"] > 0
    assert "sharded ms" in capsys.readouterr().out
