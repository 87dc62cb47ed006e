import json
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.pipeline import TwoViewStream, read_all, train_batches
from dist_contrast.data.shards import resolve_shards
from dist_contrast.errors import DataError


def test_digits_shards_counts_split_and_content(digits_dir):
    counts = json.loads((digits_dir / "counts.json").read_text())
    assert counts["train"]["samples"] + counts["val"]["samples"] == 1797
    seen = {}
    for split in ("train", "val"):
        total = 0
        for name, n in counts[split]["shards"].items():
            with tarfile.open(digits_dir / name) as tar:
                keys = {m.name.split(".")[0] for m in tar.getmembers()}
                exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
            assert len(keys) == n and exts == {"png", "cls", "txt", "json"}
            total += n
        assert total == counts[split]["samples"]
        _, labels = read_all(resolve_shards(str(digits_dir / f"{split}-*.tar")), DataConfig())
        seen[split] = labels
        assert set(labels.tolist()) == set(range(10))  # stratified: every class in both
    assert len(seen["val"]) == 360


def test_resolve_shards_patterns(digits_dir, tmp_path):
    d = str(digits_dir)
    assert len(resolve_shards(f"{d}/train-*.tar")) == 15
    assert len(resolve_shards(f"{d}/train-{{000000..000004}}.tar")) == 5
    both = resolve_shards(f"{d}/train-000000.tar,{d}/val-{{000000,000001}}.tar")
    assert [p.rsplit("/", 1)[1] for p in both] == [
        "train-000000.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert resolve_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(DataError, match=r"shard pattern '.*nothing-\*\.tar' matched no file"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def _epoch_indices(urls, rank, world, workers, seed=0, epoch=0):
    data = DataConfig(num_workers=workers, shuffle_buffer=16, image_size=8)
    stream = TwoViewStream(urls, data, AugmentConfig(), 1, seed, rank, world)
    stream.epoch = epoch
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [int(b["index"]) for b in loader]


def test_split_by_rank_and_worker_covers_each_sample_once(digits_dir):
    urls = resolve_shards(str(digits_dir / "train-*.tar"))
    per_rank = [_epoch_indices(urls, r, 2, 2) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    all_idx = per_rank[0] + per_rank[1]
    assert len(all_idx) == len(set(all_idx)) == 1437


def test_stream_is_reproducible_and_reshuffles_per_epoch(digits_dir):
    urls = resolve_shards(str(digits_dir / "train-*.tar"))[:4]
    a = _epoch_indices(urls, 0, 1, 0, seed=3, epoch=0)
    b = _epoch_indices(urls, 0, 1, 0, seed=3, epoch=0)
    c = _epoch_indices(urls, 0, 1, 0, seed=3, epoch=1)
    assert a == b
    assert a != c and sorted(a) == sorted(c)


def test_views_are_augmented_and_batches_full(digits_dir):
    urls = resolve_shards(str(digits_dir / "train-*.tar"))
    it = train_batches(
        urls, DataConfig(num_workers=0, image_size=12), AugmentConfig(), 7, seed=0, rank=0, world=1
    )
    batch = next(it)
    assert batch["view1"].shape == (7, 1, 12, 12) == batch["view2"].shape
    assert not torch.allclose(batch["view1"], batch["view2"])
    assert batch["label"].shape == (7,)


def test_too_few_shards_is_a_clear_error(digits_dir):
    urls = resolve_shards(str(digits_dir / "val-*.tar"))  # 4 shards
    with pytest.raises(DataError, match="4 shard\\(s\\) for 2 rank\\(s\\) x 3 worker\\(s\\)"):
        next(train_batches(urls, DataConfig(num_workers=3), AugmentConfig(), 4, 0, 0, 2))
