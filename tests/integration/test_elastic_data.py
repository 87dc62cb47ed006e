"""Elastic resume of the data stream: a position saved by W ranks x N workers, continued by
W' x N' readers, reads the rest of the epoch with no sample twice and none missing.

Counted from the sample keys (those delivered in batches and those of the partial batches a
reader drops at the end of its epoch), against the keys of the shards read with tarfile."""

import pickle
import tarfile
from collections import Counter

import pytest
import torch

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.loader import train_loader
from dist_contrast.errors import DataError

BATCH = 16


def _cfg(digits_dir, workers, **over):
    return DataConfig(
        train_shards=over.pop("shards", str(digits_dir / "train-*.tar")),
        num_workers=workers,
        image_size=8,
        shuffle_buffer=over.pop("shuffle_buffer", 32),
        **over,
    )


def _loader(digits_dir, rank, world, workers, **over):
    return train_loader(_cfg(digits_dir, workers, **over), AugmentConfig(), BATCH, 5, rank, world)


def _shard_keys(digits_dir, pattern="train-*.tar") -> Counter:
    keys = Counter()
    for path in sorted(digits_dir.glob(pattern)):
        with tarfile.open(path) as tar:
            keys.update({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


class Tally:
    """Keys delivered (and dropped at epoch ends) by loaders, by epoch."""

    def __init__(self):
        self.keys: dict[int, Counter] = {}

    def take(self, loader, n):
        """``n`` batches from ``loader``'s endless stream."""
        it = iter(loader)
        for _ in range(n):
            batch = next(it)  # the loader's epoch is the batch's while it is yielded
            self.keys.setdefault(loader.epoch, Counter()).update(batch["key"])

    def rest_of_epoch(self, loader):
        epoch = loader.epoch
        for batch in loader.iter_epoch():
            self.keys.setdefault(epoch, Counter()).update(batch["key"])
        assert loader.epoch == epoch + 1

    def dropped(self, loader):
        for epoch, keys in loader.dropped.items():
            self.keys.setdefault(epoch, Counter()).update(keys)


def _save(loaders):
    states = [pickle.loads(pickle.dumps(ld.state_dict())) for ld in loaders]  # as saved
    for ld in loaders:
        ld.close()
    return states


def _old_run(digits_dir, steps, tally):
    """2 ranks x 2 workers, ``steps`` batches each in lockstep; their saved positions."""
    old = [_loader(digits_dir, r, 2, 2) for r in range(2)]
    for ld in old:
        tally.take(ld, steps)
        tally.dropped(ld)
    return _save(old)


def _resume(digits_dir, states, world, workers, tally, epochs=1):
    """``world`` new ranks restored from ``states``, each read to the end of ``epochs``."""
    summaries = []
    for r in range(world):
        ld = _loader(digits_dir, r, world, workers)
        summaries.append(ld.load_elastic(states))
        for _ in range(epochs):
            tally.rest_of_epoch(ld)
        tally.dropped(ld)
        ld.close()
    assert all(s == summaries[0] for s in summaries)  # every rank computes the same
    return summaries[0]


@pytest.fixture(scope="module")
def digits_40(tmp_path_factory):
    """The digits in shards of 40 samples (38 train shards): every one of 32 readers has one."""
    from dist_contrast.data.write.digits import write_digits

    out = tmp_path_factory.mktemp("digits_40")
    write_digits(out, shard_size=40)
    return out


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (32, 0)])
def test_uninterrupted_epoch_reads_every_key_once(digits_dir, digits_40, world, workers):
    """Also 32 readers, each over its own shards of 40 samples."""
    digits_dir = digits_40 if world > 2 else digits_dir
    tally = Tally()
    for r in range(world):
        ld = _loader(digits_dir, r, world, workers)
        tally.rest_of_epoch(ld)
        tally.dropped(ld)
        ld.close()
    assert tally.keys[0] == _shard_keys(digits_dir)


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (4, 1)])
def test_elastic_resume_reads_the_rest_of_the_epoch_once(digits_dir, world, workers):
    tally = Tally()
    states = _old_run(digits_dir, 12, tally)
    before = sum(tally.keys[0].values())
    summary = _resume(digits_dir, states, world, workers, tally)
    full = _shard_keys(digits_dir)
    assert tally.keys[0] == full  # none twice, none missing
    assert summary["left"] == sum(full.values()) - before  # consumed = the delivered batches
    assert summary["epoch"] == 0 and (summary["was_world"], summary["was_workers"]) == (2, 2)


def test_next_epoch_after_the_elastic_one_is_a_normal_epoch(digits_dir):
    tally = Tally()
    states = _old_run(digits_dir, 5, tally)
    ld = _loader(digits_dir, 0, 1, 1)
    ld.load_elastic(states)
    tally.rest_of_epoch(ld)
    got = next(iter(ld))
    ld.close()
    fresh = _loader(digits_dir, 0, 1, 1)
    tally.rest_of_epoch(fresh)  # a plain run's epoch 1
    want = next(iter(fresh))
    fresh.close()
    assert want["key"] == got["key"] and torch.equal(want["view1"], got["view1"])


def test_ranks_in_different_epochs_and_more_readers_than_shards_left(digits_dir):
    """Rank 1 reads 7 shards, rank 0 reads 8: after 44 steps rank 1 is in epoch 1 and rank 0
    near the end of epoch 0. 8 new ranks share the few shards left: some get nothing, which
    ends their elastic epoch without an error; both epochs come out whole."""
    tally = Tally()
    states = _old_run(digits_dir, 44, tally)
    assert [s["epoch"] for s in states] == [0, 1]
    summary = _resume(digits_dir, states, 8, 1, tally, epochs=2)
    full = _shard_keys(digits_dir)
    assert tally.keys[0] == full and tally.keys[1] == full
    assert summary["epoch"] == 0 and set(summary["epochs"]) == {0, 1}


def test_same_world_resume_inside_an_elastic_epoch_is_exact(digits_dir):
    tally = Tally()
    states = _old_run(digits_dir, 10, tally)
    straight = _loader(digits_dir, 1, 4, 1)
    straight.load_elastic(states)
    want = list(straight.iter_epoch())
    straight.close()
    first = _loader(digits_dir, 1, 4, 1)
    first.load_elastic(states)
    it = iter(first)
    got = [next(it) for _ in range(3)]
    (state,) = _save([first])
    again = _loader(digits_dir, 1, 4, 1)
    again.load_state_dict(state)
    got += list(again.iter_epoch())
    again.close()
    assert [b["key"] for b in got] == [b["key"] for b in want]
    assert all(torch.equal(a["view1"], b["view1"]) for a, b in zip(got, want, strict=True))


def test_elastic_resume_twice_in_one_epoch(digits_dir):
    """2 x 2 -> 4 x 1 (some batches) -> 1 x 2 to the end: still every key once."""
    tally = Tally()
    states = _old_run(digits_dir, 8, tally)
    mid = [_loader(digits_dir, r, 4, 1) for r in range(4)]
    for ld in mid:
        ld.load_elastic(states)
        tally.take(ld, 6)
        tally.dropped(ld)
    _resume(digits_dir, _save(mid), 1, 2, tally)
    assert tally.keys[0] == _shard_keys(digits_dir)


def test_resampled_epoch_keeps_its_sample_count(digits_dir):
    over = {"resampled": True, "epoch_samples": 640}
    states = []
    for r in range(2):
        ld = _loader(digits_dir, r, 2, 2, **over)
        it = iter(ld)
        for _ in range(4):
            next(it)
        states += _save([ld])
    left = 640 - 2 * 4 * BATCH
    batches = 0
    for r in range(4):
        ld = _loader(digits_dir, r, 4, 1, **over)
        summary = ld.load_elastic(states)
        assert summary["left"] == left
        batches += len(list(ld.iter_epoch()))
        ld.close()
    assert batches == 4 * (-(-left // 4) // BATCH)  # the rest re-split over the new readers


def test_positions_of_other_shards_are_refused(digits_dir):
    states = _old_run(digits_dir, 1, Tally())
    ld = _loader(digits_dir, 0, 1, 1, shards=str(digits_dir / "train-00000[0-7].tar"))
    with pytest.raises(DataError, match="shards"):
        ld.load_elastic(states)
    ld = _loader(digits_dir, 0, 1, 1, shuffle_buffer=8)
    with pytest.raises(DataError, match="shuffle_buffer"):
        ld.load_elastic(states)


def test_elastic_chain_32_to_8_to_16_reads_the_epoch_once(digits_40):
    """32 readers stop, 8 go on from their positions and stop, 16 read the rest: the epoch's
    keys, delivered and dropped, are the shards' (tarfile's) multiset."""
    tally = Tally()
    old = [_loader(digits_40, r, 32, 0) for r in range(32)]
    for ld in old:
        tally.take(ld, 1)
        tally.dropped(ld)
    states = _save(old)
    middle = []
    for r in range(8):
        ld = _loader(digits_40, r, 8, 0)
        ld.load_elastic(states)
        tally.take(ld, 3)
        tally.dropped(ld)
        middle.append(ld)
    assert all(ld.epoch == 0 for ld in middle)
    summary = _resume(digits_40, _save(middle), 16, 0, tally)
    assert (summary["was_world"], summary["epoch"]) == (8, 0)
    assert tally.keys[0] == _shard_keys(digits_40)
