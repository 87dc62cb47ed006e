"""WebDataset pipelines: shards -> samples -> views -> batches.

Shards are split by rank and then by loader worker; all randomness comes from
(seed, epoch, rank, worker), so a run is reproducible. The training stream is endless: each
rank walks its shards epoch after epoch, reshuffled each time, and every batch is full, so all
ranks always have a next batch and never wait on each other at a collective.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.augment import random_view, resize
from dist_contrast.errors import DataError

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across processes, unlike hash())."""
    state = np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def shuffle_buffer(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Approximate shuffle with a buffer of ``size`` samples (reproducible under ``rng``)."""
    buf: list[dict] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def decode_image(sample: dict, channels: int) -> torch.Tensor:
    """The sample's image as a float tensor [C, h, w] in [0, 1]."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({'/'.join(IMAGE_KEYS)})")
    with Image.open(io.BytesIO(sample[key])) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    t = torch.from_numpy(arr / 255.0)
    return t[None] if channels == 1 else t.permute(2, 0, 1).contiguous()


def decode_label(sample: dict) -> int:
    raw = sample.get("cls")
    return int(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else -1


def decode_index(sample: dict) -> int:
    """The sample's index in its data set (``json`` field ``index``), or -1."""
    raw = sample.get("json")
    if raw is None:
        return -1
    meta = json.loads(raw)
    return int(meta.get("index", -1)) if isinstance(meta, dict) else -1


def _samples(urls: list[str]) -> Iterator[dict]:
    yield from wds.tarfile_samples([{"url": u} for u in urls])


@dataclass
class Split:
    """Which part of the shard list one (rank, worker) reads."""

    rank: int
    world: int
    worker: int
    workers: int

    def take(self, shards: list[str]) -> list[str]:
        return shards[self.rank :: self.world][self.worker :: self.workers]


class TwoViewStream(IterableDataset):
    """Full batches of two augmented views (and labels) from this rank's shards, one epoch per
    iteration; set ``epoch`` before iterating to get that epoch's order."""

    def __init__(
        self,
        urls: list[str],
        data: DataConfig,
        augment: AugmentConfig,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
    ) -> None:
        self.urls, self.data, self.augment = list(urls), data, augment
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        split = Split(
            self.rank, self.world, info.id if info else 0, info.num_workers if info else 1
        )
        shards = list(self.urls)
        random.Random(mix_seed(self.seed, self.epoch)).shuffle(shards)  # same on every rank
        mine = split.take(shards)
        rng = random.Random(mix_seed(self.seed, self.epoch, split.rank, split.worker, 1))
        gen = torch.Generator().manual_seed(
            mix_seed(self.seed, self.epoch, split.rank, split.worker, 2)
        )
        samples = _samples(mine)
        if self.data.shuffle_buffer > 1:
            samples = shuffle_buffer(samples, self.data.shuffle_buffer, rng)
        batch: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        size = self.data.image_size
        for sample in samples:
            img = decode_image(sample, self.data.channels)
            v1 = random_view(img, size, self.augment, gen)
            v2 = random_view(img, size, self.augment, gen)
            batch.append((v1, v2, decode_label(sample), decode_index(sample)))
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
    v1, v2, labels, index = zip(*batch, strict=True)
    return {
        "view1": torch.stack(v1),
        "view2": torch.stack(v2),
        "label": torch.tensor(labels),
        "index": torch.tensor(index),
    }


def check_split(n_shards: int, world: int, workers: int, what: str) -> None:
    readers = world * max(1, workers)
    if n_shards < readers:
        raise DataError(
            f"{what}: {n_shards} shard(s) for {world} rank(s) x {max(1, workers)} worker(s); "
            f"every reader needs at least one shard: write smaller shards or lower data.num_workers"
        )


def train_batches(
    urls: list[str],
    data: DataConfig,
    augment: AugmentConfig,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of this rank's training batches, epoch after epoch."""
    check_split(len(urls), world, data.num_workers, "data.train_shards")
    stream = TwoViewStream(urls, data, augment, batch_size, seed, rank, world)
    epoch = 0
    while True:
        stream.epoch = epoch
        loader = DataLoader(stream, batch_size=None, num_workers=data.num_workers)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise DataError(
                f"data.train_shards: rank {rank} got no full batch of {batch_size} from its shards"
            )
        epoch += 1


def read_all(urls: list[str], data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``urls`` in order, resized, no augmentation: (images, labels)."""
    images, labels = [], []
    for sample in _samples(urls):
        images.append(resize(decode_image(sample, data.channels), data.image_size))
        labels.append(decode_label(sample))
    if not images:
        raise DataError(f"no sample in {len(urls)} shard(s): {urls[0]} ...")
    return torch.stack(images), torch.tensor(labels)
