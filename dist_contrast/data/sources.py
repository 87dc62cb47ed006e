"""Which shards each reader (rank x loader worker) reads, in which order.

Not resampled: each epoch the shard list of a source is shuffled with (seed, epoch), the same on
every rank, then split by rank and by worker, so every sample is read once per epoch. Resampled:
each reader draws shards with replacement from the whole list with its own (seed, epoch, rank,
worker) generator; an epoch is then a number of samples, not a pass over the data. After an
elastic resume, the rest of an epoch is dealt to the readers by :mod:`.position` instead.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from dist_contrast.data.shards import REMOTE_PREFIXES, resolve_shards
from dist_contrast.distributed import mix_seed
from dist_contrast.errors import DataError


@dataclass(frozen=True)
class Reader:
    """One reader of the data: a loader worker of a rank."""

    rank: int
    world: int
    worker: int
    workers: int

    @property
    def index(self) -> int:
        return self.rank * self.workers + self.worker

    @property
    def count(self) -> int:
        return self.world * self.workers


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0

    def epoch_shards(self, reader: Reader, seed: int, epoch: int, source_id: int) -> list[str]:
        shards = list(self.urls)
        random.Random(mix_seed(seed, epoch, source_id)).shuffle(shards)  # same on every rank
        return shards[reader.rank :: reader.world][reader.worker :: reader.workers]

    def resampled_shards(
        self, reader: Reader, seed: int, epoch: int, source_id: int, *salt: int
    ) -> Iterator[str]:
        """Shards drawn with replacement; ``salt`` (an elastic resume's plan) draws anew."""
        parts = (seed, epoch, reader.rank, reader.worker, source_id, 17, *salt)
        rng = random.Random(mix_seed(*parts))
        while True:
            yield rng.choice(self.urls)


def build_sources(spec: str | list[str], weights: list[float], what: str) -> list[Source]:
    """One source per list entry when weights are given, else one pool of all patterns."""
    if weights:
        entries = spec if isinstance(spec, list) else [spec]
        return [
            Source(tuple(resolve_shards(e, what)), w) for e, w in zip(entries, weights, strict=True)
        ]
    return [Source(tuple(resolve_shards(spec, what)), 1.0)]


def check_readers(
    sources: list[Source], world: int, workers: int, resampled: bool, what: str
) -> None:
    """Every reader needs a shard of every source, unless shards are resampled."""
    if resampled:
        return
    readers = world * max(1, workers)
    for i, src in enumerate(sources):
        if len(src.urls) < readers:
            name = f"{what}[{i}]" if len(sources) > 1 else what
            raise DataError(
                f"{name}: {len(src.urls)} shard(s) for {world} rank(s) x {max(1, workers)} "
                f"worker(s); every reader needs at least one shard: write smaller shards, lower "
                f"data.num_workers, or set data.resampled=true"
            )


def mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Samples drawn from ``streams`` with probabilities ``weights`` until all are exhausted."""
    live = list(range(len(streams)))
    while live:
        i = live[0] if len(live) == 1 else rng.choices(live, [weights[j] for j in live])[0]
        try:
            yield next(streams[i])
        except StopIteration:
            live.remove(i)


def first_sample(urls: list[str]) -> tuple[dict, str] | None:
    """The first sample of the first local shard that has one, and its shard; ``None`` when
    the shards are remote or hold no sample (nothing is fetched over a network for a check)."""
    from dist_contrast.data.tario import Faults, tar_samples

    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            return None
        faults = Faults(muted=True)
        for sample in tar_samples(url, faults):
            return sample, url
    return None
