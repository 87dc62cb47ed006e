"""Exact resume of the data stream: interrupted after N batches and restored from the saved
position, a rank receives the batches an uninterrupted run would have, in the same order."""

import pickle

import pytest
import torch

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data import pipeline
from dist_contrast.data.loader import train_loader


def _loader(digits_dir, rank, resampled):
    cfg = DataConfig(
        train_shards=str(digits_dir / "train-*.tar"),
        num_workers=2,
        image_size=8,
        shuffle_buffer=32,
        resampled=resampled,
        epoch_samples=1200,
    )
    return train_loader(cfg, AugmentConfig(), 16, seed=5, rank=rank, world=2)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["view1"], y["view1"]) and torch.equal(x["view2"], y["view2"])


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
def test_resume_gives_the_uninterrupted_batches(digits_dir, resampled, rank):
    # 1437 / 2 ranks ~ 718 samples -> ~44 batches per epoch and rank; 50 + 10 crosses an epoch.
    straight = _take(iter(_loader(digits_dir, rank, resampled)), 60)
    for n in (7, 50):
        first = _loader(digits_dir, rank, resampled)
        it = iter(first)
        _same(_take(it, n), straight[:n])
        state = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = _loader(digits_dir, rank, resampled)
        resumed.load_state_dict(state)
        _same(_take(iter(resumed), 60 - n), straight[n:])


def test_skipped_samples_are_not_decoded(digits_dir, monkeypatch):
    loader = _loader(digits_dir, 0, False)
    loader.num_workers = 0  # count decodes in this process
    loader.workers = 1
    loader._reset_epoch()
    it = iter(loader)
    _take(it, 10)
    state = loader.state_dict()
    calls = []
    real = pipeline.decode_or_count

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_or_count", counting)
    resumed = _loader(digits_dir, 0, False)
    resumed.num_workers, resumed.workers = 0, 1
    resumed._reset_epoch()
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert len(calls) == 16  # only the next batch's samples, none of the 160 skipped


def test_position_of_another_world_size_is_refused(digits_dir):
    state = _loader(digits_dir, 0, False).state_dict()
    state["world"] = 4
    with pytest.raises(Exception, match="for 4 rank"):
        _loader(digits_dir, 0, False).load_state_dict(state)
