"""Rank-local state re-sharded on resume with another number of ranks (an elastic resume).

The old world's shards are built in one process with explicit ``world``/``rank``, filled with
distinct keys (pointers at different places, one ring wrapped around), saved, and loaded by
every rank of the new world. References are computed from the enqueue history (a queue shard
holds the last K_shard rows written to it, oldest first), not from the pointer arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_contrast.config import LossConfig
from dist_contrast.losses.kernels.numerics import normalize
from dist_contrast.methods.base import Method
from dist_contrast.methods.clip import CLIP, MomentumQueues, objective
from dist_contrast.methods.instdisc import InstDisc
from dist_contrast.methods.moco import MoCoV2
from dist_contrast.models.towers import Tower
from dist_contrast.negatives import MemoryBank, ShardedQueue
from dist_contrast.negatives.queue import nearest_queue_size

D, K = 4, 12
OLD = 2
# keys each old rank enqueues, batch by batch: rank 0 wraps around its 6 slots (ptr 2),
# rank 1 does not (ptr 3)
BATCHES = {0: [4, 4], 1: [3]}


def _fill_old_queues(seed: int = 0, size: int = K) -> tuple[list[ShardedQueue], torch.Tensor]:
    """The old world's shards, filled, and the reference: the old queue in its global order by
    age (oldest first; rows of equal age in old-rank order)."""
    gen = torch.Generator().manual_seed(seed + 100)
    queues, histories = [], []
    for r in range(OLD):
        q = ShardedQueue(D, size, world=OLD, rank=r, seed=seed)
        history = list(q.keys.clone())  # the initial rows count as written first
        for n in BATCHES[r]:
            keys = torch.randn(n, D, generator=gen)
            q.enqueue(keys)
            history += list(normalize(keys))
        queues.append(q)
        histories.append(history[-q.shard_size :])
    by_age = [h[a] for a in range(size // OLD) for h in histories]
    return queues, torch.stack(by_age)


def _new_world_order(queues: list[ShardedQueue]) -> torch.Tensor:
    """The new queue in the canonical order: slot ``s`` of rank ``r`` is row ``s * W + r``
    (every pointer 0: slot 0 is the oldest)."""
    world = len(queues)
    assert all(q.ptr == 0 for q in queues)
    out = torch.empty(world * queues[0].shard_size, D)
    for r, q in enumerate(queues):
        out[r::world] = q.keys
    return out


def _reshard(states: list[dict], world: int, size: int = K, seed: int = 0):
    new = [ShardedQueue(D, size, world=world, rank=r, seed=seed + 7) for r in range(world)]
    olds = [q.load_resharded(states) for q in new]
    return new, olds


@pytest.mark.parametrize("world", [4, 1, 3])
def test_queue_rows_keep_their_order_by_age_on_another_world(world):
    old, reference = _fill_old_queues()
    assert [q.ptr for q in old] == [2, 3]
    new, olds = _reshard([q.shard_state_dict() for q in old], world)
    assert olds == [K] * world
    assert torch.equal(_new_world_order(new), reference)
    # the next key overwrites the oldest row of the queue
    new[0].enqueue(torch.ones(1, D))
    assert torch.equal(new[0].keys[0], normalize(torch.ones(1, D))[0])


def test_queue_back_and_forth_is_the_identity():
    old, reference = _fill_old_queues()
    four, _ = _reshard([q.shard_state_dict() for q in old], 4)
    two, _ = _reshard([q.shard_state_dict() for q in four], 2)
    assert torch.equal(_new_world_order(two), reference)


def test_queue_same_world_is_the_exact_restore():
    old, _ = _fill_old_queues()
    states = [q.shard_state_dict() for q in old]
    for r in range(OLD):
        exact = ShardedQueue(D, K, world=OLD, rank=r, seed=9)
        exact.load_shard_state_dict(states[r])
        elastic = ShardedQueue(D, K, world=OLD, rank=r, seed=9)
        assert elastic.load_resharded(states) is None
        assert torch.equal(elastic.keys, exact.keys) and elastic.ptr == exact.ptr == old[r].ptr


def test_queue_smaller_keeps_the_newest_rows():
    old, reference = _fill_old_queues()
    new, olds = _reshard([q.shard_state_dict() for q in old], 4, size=8)
    assert olds == [K] * 4
    assert torch.equal(_new_world_order(new), reference[-8:])


def test_queue_larger_takes_fresh_rows_as_the_oldest():
    old, reference = _fill_old_queues()
    new, _ = _reshard([q.shard_state_dict() for q in old], 4, size=16, seed=3)
    fresh = _new_world_order([ShardedQueue(D, 16, world=4, rank=r, seed=10) for r in range(4)])
    got = _new_world_order(new)
    assert torch.equal(got[4:], reference)
    assert torch.equal(got[:4], fresh[:4])  # what a fresh queue (seed 3 + 7) holds there


def test_queue_refuses_inconsistent_states():
    old, _ = _fill_old_queues()
    states = [q.shard_state_dict() for q in old]
    with pytest.raises(ValueError, match="rank 1 of 2"):
        ShardedQueue(D, K, world=4, rank=0).load_resharded([states[0], states[0]])
    with pytest.raises(ValueError, match="saved by 2 rank"):
        ShardedQueue(D, K, world=4, rank=0).load_resharded(states[:1])
    with pytest.raises(ValueError, match="dimension"):
        ShardedQueue(D + 1, K, world=4, rank=0).load_resharded(states)


def test_nearest_queue_size():
    assert nearest_queue_size(4096, 4) == 4096
    assert nearest_queue_size(4096, 3) == 4095
    assert nearest_queue_size(4096, 6) == 4098
    assert nearest_queue_size(10, 4) == 8  # a tie: the lower one
    assert nearest_queue_size(3, 8) == 8
    with pytest.raises(ValueError, match="e.g. 4095"):
        ShardedQueue(D, 4096, world=3, rank=0)


# --------------------------------------------------------------------------------------------
# The memory bank: row i on rank i % W at slot i // W, whatever W

N = 11


def _old_banks() -> tuple[list[MemoryBank], torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    banks = [MemoryBank(N, D, world=OLD, rank=r, seed=1) for r in range(OLD)]
    full = torch.empty(N, D)
    for r, bank in enumerate(banks):
        bank.rows.copy_(normalize(torch.randn(bank.shard_size, D, generator=gen)))
        bank.z.fill_(0.25)
        bank.sample_negatives(3)  # move the generators on
        full[r::OLD] = bank.rows
    return banks, full


@pytest.mark.parametrize("world", [4, 1, 3])
def test_bank_rows_move_to_their_new_owners(world):
    old, full = _old_banks()
    states = [b.shard_state_dict() for b in old]
    for r in range(world):
        bank = MemoryBank(N, D, world=world, rank=r, seed=1)
        assert bank.load_rerouted(states) is True
        assert torch.equal(bank.rows, full[r::world])
        assert float(bank.z) == 0.25
        if r < OLD:  # an old rank keeps its sampling generator
            assert torch.equal(bank.generator.get_state(), old[r].generator.get_state())
        else:  # a new one starts from its seed, as a fresh bank does
            fresh = MemoryBank(N, D, world=world, rank=r, seed=1).generator.get_state()
            assert torch.equal(bank.generator.get_state(), fresh)


def test_bank_same_world_is_the_exact_restore():
    old, _ = _old_banks()
    states = [b.shard_state_dict() for b in old]
    for r in range(OLD):
        exact, elastic = (MemoryBank(N, D, world=OLD, rank=r, seed=2) for _ in range(2))
        exact.load_shard_state_dict(states[r])
        assert elastic.load_rerouted(states) is False
        assert torch.equal(elastic.rows, exact.rows) and float(elastic.z) == float(exact.z)
        assert torch.equal(elastic.generator.get_state(), exact.generator.get_state())


def test_bank_refuses_disagreeing_z_and_another_size():
    old, _ = _old_banks()
    states = [b.shard_state_dict() for b in old]
    states[1]["z"] = 0.5
    with pytest.raises(ValueError, match="z"):
        MemoryBank(N, D, world=4, rank=0).load_rerouted(states)
    with pytest.raises(ValueError, match="n_data"):
        MemoryBank(N + 1, D, world=4, rank=0).load_rerouted([b.shard_state_dict() for b in old])


# --------------------------------------------------------------------------------------------
# Through the methods: load_extra_state_elastic


def _moco(world: int, rank: int) -> MoCoV2:
    torch.manual_seed(0)
    queue = ShardedQueue(D, K, world=world, rank=rank)
    return MoCoV2(nn.Linear(3, D), nn.Linear(D, D), queue, temperature=0.2, momentum=0.99)


class _Encoder(nn.Linear):
    out_dim = 5


def _clip(world: int, rank: int) -> CLIP:
    torch.manual_seed(0)
    image, text = Tower(_Encoder(3, 5), D), Tower(_Encoder(3, 5), D)
    queues = MomentumQueues(image, text, K, 0, None, 1, world=world, rank=rank)
    return CLIP(image, text, objective(LossConfig(name="clip")), queues)


def _instdisc(world: int, rank: int) -> InstDisc:
    torch.manual_seed(0)
    bank = MemoryBank(N, D, world=world, rank=rank, seed=1)
    return InstDisc(nn.Linear(3, D), nn.Linear(D, D), bank)


def _old_methods(build, fill) -> list:
    methods = [build(OLD, r) for r in range(OLD)]
    old_queues, _ = _fill_old_queues()
    old_banks, _ = _old_banks()
    for r, m in enumerate(methods):
        fill(m, old_queues[r], old_banks[r])
        m.step = 6
    return methods


def _set_queue(queue: ShardedQueue, source: ShardedQueue, flip: bool = False) -> None:
    queue.load_shard_state_dict(source.shard_state_dict())
    if flip:  # another queue of the same layout, other rows
        queue.keys.neg_()


def _fill_moco(m, q, b):
    _set_queue(m.queue, q)


def _fill_clip(m, q, b):
    _set_queue(m.queues.image_queue, q)
    _set_queue(m.queues.text_queue, q, flip=True)


def _fill_instdisc(m, q, b):
    m.bank.load_shard_state_dict(b.shard_state_dict())


def _moco_queues(m):
    return [(m.queue, 1)]


def _clip_queues(m):
    return [(m.queues.image_queue, 1), (m.queues.text_queue, -1)]  # sign: as _fill_clip set it


QUEUE_METHODS = [
    (_moco, _fill_moco, _moco_queues, "queue 12 keys re-sharded"),
    (_clip, _fill_clip, _clip_queues, "image/text queues 2 x 12 keys re-sharded"),
]


@pytest.mark.parametrize(("build", "fill", "queues", "phrase"), QUEUE_METHODS)
@pytest.mark.parametrize("world", [4, 1])
def test_method_queues_keep_their_rows_and_order(build, fill, queues, phrase, world):
    old = _old_methods(build, fill)
    states = [m.extra_state() for m in old]
    new = [build(world, r) for r in range(world)]
    assert [m.load_extra_state_elastic(states) for m in new] == [[phrase]] * world
    assert all(m.step == 6 for m in new)
    _, reference = _fill_old_queues()
    for i, (_, sign) in enumerate(queues(new[0])):
        got = _new_world_order([queues(m)[i][0] for m in new])
        assert torch.equal(got, sign * reference)


@pytest.mark.parametrize("world", [4, 1])
def test_instdisc_bank_rows_on_their_new_owners(world):
    old = _old_methods(_instdisc, _fill_instdisc)
    _, full = _old_banks()
    states = [m.extra_state() for m in old]
    new = [_instdisc(world, r) for r in range(world)]
    assert [m.load_extra_state_elastic(states) for m in new] == [["bank 11 rows re-routed"]] * world
    for r, m in enumerate(new):
        assert torch.equal(m.bank.rows, full[r::world])


@pytest.mark.parametrize(
    ("build", "fill"),
    [(_moco, _fill_moco), (_clip, _fill_clip), (_instdisc, _fill_instdisc)],
)
def test_method_same_world_equals_load_extra_state(build, fill):
    old = _old_methods(build, fill)
    states = [m.extra_state() for m in old]
    for r in range(OLD):
        exact, elastic = build(OLD, r), build(OLD, r)
        exact.load_extra_state(states[r])
        assert elastic.load_extra_state_elastic(states) == []
        assert _tensors(elastic.extra_state()) == _tensors(exact.extra_state())


def _tensors(tree):
    """A nested state with tensors made comparable (lists)."""
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    return tree.tolist() if isinstance(tree, torch.Tensor) else tree


def test_momentum_step_must_agree_across_ranks():
    old = _old_methods(_moco, _fill_moco)
    states = [m.extra_state() for m in old]
    states[1]["step"] = 5
    with pytest.raises(ValueError, match="step"):
        _moco(4, 0).load_extra_state_elastic(states)


def test_queue_size_change_is_said():
    old = _old_methods(_moco, _fill_moco)
    states = [m.extra_state() for m in old]
    m = MoCoV2(
        nn.Linear(3, D),
        nn.Linear(D, D),
        ShardedQueue(D, 9, world=3, rank=0),
        temperature=0.2,
        momentum=0.99,
    )
    assert m.load_extra_state_elastic(states) == ["queue 12 keys re-sharded into 9 (newest kept)"]


class _Plain(Method):
    """A method whose extra state every rank holds alike (the base class's default)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.state = nn.Identity(), {}

    def embed(self, batch):
        return {}

    def loss(self, emb, batch):
        raise NotImplementedError

    def extra_state(self):
        return dict(self.state)

    def load_extra_state(self, state):
        self.state = dict(state)


def test_base_default_loads_the_agreed_state_of_rank_0():
    m = _Plain()
    assert m.load_extra_state_elastic([{"a": 1}, {"a": 1}, {"a": 1}]) == []
    assert m.state == {"a": 1}
    with pytest.raises(ValueError, match="'a' differs"):
        m.load_extra_state_elastic([{"a": 1}, {"a": 2}])
    with pytest.raises(ValueError, match="no extra states"):
        m.load_extra_state_elastic([])
