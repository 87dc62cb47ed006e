"""The data position of an epoch, independent of the world size: which samples were consumed,
and the rest of the epoch dealt to another number of readers (an elastic resume).

Every rank saves its loader's position: per reader (worker), the raw samples its delivered
batches used. From the positions of ALL old ranks, :func:`elastic_plans` replays each old
reader's raw stream (its shards, the mix and the shuffle buffer, with the same seeds; nothing
decoded) up to its position and notes the (shard, index in shard) of every sample it emitted:
those were consumed; samples read into a shuffle buffer but not emitted were not. The rest of
the epoch is every other sample of the epoch's shards: partly read shards first (with the
indices to skip), then unread ones, in the epoch's global shard order, dealt to the new readers
as shards are in a normal epoch (by rank, then by worker). Each new rank computes the same
deal, without communication, and keeps its share as a *plan* for that epoch.

Resampled sources (drawn with replacement) have no shard to place: an epoch is a number of
samples, and the samples left of it are re-split over the new readers, whose draws are salted
with that number so that they do not replay the old readers' draws.

Ranks need not be in the same epoch (a rank with fewer shards moves on first): every epoch from
the oldest to the newest of the saved positions gets its plan.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dist_contrast.data.shards import REMOTE_PREFIXES
from dist_contrast.data.sources import Reader, Source
from dist_contrast.data.tario import Faults, split_name, tar_samples
from dist_contrast.distributed import mix_seed
from dist_contrast.errors import DataError
from dist_contrast.files import open_regular

Piece = tuple[str, list[int]]  # a shard and the indices of its samples to skip (consumed)


def layout(stream: Any) -> dict:
    """What the replay of a position depends on besides the positions themselves."""
    d = stream.data
    return {
        "seed": stream.seed,
        "shuffle_buffer": d.shuffle_buffer,
        "resampled": d.resampled,
        "epoch_samples": d.epoch_samples,
        "sources": [
            {
                "shards": len(s.urls),
                "weight": s.weight,
                "digest": hashlib.sha1("\n".join(s.urls).encode()).hexdigest()[:16],
            }
            for s in stream.sources
        ],
    }


def check_layout(saved: dict | None, now: dict) -> None:
    """A :class:`DataError` naming the first setting the saved position depends on that
    differs in this run."""
    if saved is None:
        raise DataError(
            "the checkpoint's data position predates elastic resume: it cannot be dealt"
        )
    names = {
        "seed": "run.seed",
        "shuffle_buffer": "data.shuffle_buffer",
        "resampled": "data.resampled",
        "epoch_samples": "data.epoch_samples",
    }
    for key, name in names.items():
        if saved[key] != now[key]:
            raise DataError(
                f"the checkpoint's data position was saved with {name}={saved[key]}, this run "
                f"has {now[key]}: the samples it consumed cannot be placed"
            )
    if saved["sources"] != now["sources"]:
        raise DataError(
            "the checkpoint's data position is for other shards (data.train_shards or "
            "data.train_weights differ: shard lists or weights): the samples it consumed "
            "cannot be placed"
        )


@dataclass(frozen=True)
class OldReader:
    """A reader of the saved run, what it read in one epoch and how far."""

    reader: Reader
    plan: dict | None  # its rank's plan for the epoch, None in a normal epoch
    state: str  # "before" (not started), "at" (reading), "done" (its share consumed)
    raw: int  # raw samples consumed ("at")


def old_readers(states: list[dict], epoch: int) -> list[OldReader]:
    """Every reader of the saved run (rank order, then worker), and where it was in ``epoch``."""
    out = []
    for s in states:
        workers, plan = s["workers"], plans_of(s).get(epoch)
        raw, done = {int(k): int(p["raw"]) for k, p in s["pos"].items()}, set(s["done"])
        for w in range(workers):
            reader = Reader(s["rank"], s["world"], w, workers)
            if s["epoch"] > epoch or (s["epoch"] == epoch and w in done):
                out.append(OldReader(reader, plan, "done", 0))
            elif s["epoch"] == epoch:
                out.append(OldReader(reader, plan, "at", raw[w]))
            else:
                out.append(OldReader(reader, plan, "before", 0))
    return out


def plans_of(state: dict) -> dict[int, dict]:
    return {int(k): v for k, v in (state.get("plans") or {}).items()}


def epoch_order(source: Source, seed: int, epoch: int, source_id: int) -> list[str]:
    """The epoch's global shard order of a source (before the split over the readers)."""
    return source.epoch_shards(Reader(0, 1, 0, 1), seed, epoch, source_id)


def shard_size(url: str) -> int:
    """Samples in a shard, as :func:`tario.tar_samples` yields them: a local tar's headers
    only, a remote one (or a broken one) read through."""
    if not url.startswith(REMOTE_PREFIXES):
        try:
            with open_regular(url) as f, tarfile.open(fileobj=f) as tar:
                names = [split_name(m.name) for m in tar.getmembers() if m.isfile()]
            keys = [p[0] for p in names if p is not None]
            return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)
        except (tarfile.TarError, OSError, EOFError):
            pass
    return sum(1 for _ in tar_samples(url, Faults(muted=True)))


def _replay(stream: Any, old: OldReader, epoch: int) -> Iterator[tuple[str, int]]:
    """(shard, index in shard) of the raw samples an old reader consumed."""
    samples = stream.raw_samples(old.reader, epoch, Faults(muted=True), old.plan)
    for n, sample in enumerate(samples):
        if n >= old.raw:
            return
        yield sample["__url__"], sample["__index__"]


def _consumed(stream: Any, states: list[dict], epoch: int) -> list[dict[str, set[int] | None]]:
    """Per source, per shard of the epoch: the consumed sample indices (None: all of them)."""
    readers = old_readers(states, epoch)
    plan = next((r.plan for r in readers if r.plan), None)
    out: list[dict[str, set[int] | None]] = [{} for _ in stream.sources]
    source_of = {u: i for i, src in reversed(list(enumerate(stream.sources))) for u in src.urls}
    if plan is not None:  # a plan epoch: what no plan still holds was consumed before it
        for i, src in enumerate(stream.sources):
            out[i] = dict.fromkeys(src.urls)
        for r in readers:
            if r.state != "done" and r.plan:
                for i, pieces in enumerate(r.plan["pieces"]):
                    for url, skip in pieces[r.reader.worker :: r.reader.workers]:
                        out[i][url] = set(skip)
    for r in readers:
        if r.state == "done" and plan is None:  # its whole share (a plan's: None already)
            for i, src in enumerate(stream.sources):
                for url in src.epoch_shards(r.reader, stream.seed, epoch, i):
                    out[i][url] = None
        elif r.state == "at":
            for url, index in _replay(stream, r, epoch):
                done = out[source_of[url]].setdefault(url, set())
                if done is not None:
                    done.add(index)
    return out


def _resampled_left(stream: Any, states: list[dict], epoch: int) -> int:
    left = 0
    for r in old_readers(states, epoch):
        quota = (
            r.plan["take"]
            if r.plan
            else -(-stream.data.epoch_samples // (r.reader.world * r.reader.workers))
        )
        left += {"before": quota, "at": max(0, quota - r.raw), "done": 0}[r.state]
    return left


def epoch_plans(stream: Any, states: list[dict], epoch: int) -> tuple[list[list[Piece]], int]:
    """The rest of ``epoch`` per source, in the order it is dealt, and its sample count."""
    if stream.data.resampled:
        return [], _resampled_left(stream, states, epoch)
    consumed = _consumed(stream, states, epoch)
    rest, left = [], 0
    for i, src in enumerate(stream.sources):
        partly, unread = [], []
        for url in epoch_order(src, stream.seed, epoch, i):
            done = consumed[i].get(url, set())
            if done is None:
                continue
            n = shard_size(url)
            if len(done) < n:
                left += n - len(done)
                (partly if done else unread).append((url, sorted(done)))
        rest.append(partly + unread)
    return rest, left


def elastic_plans(stream: Any, states: list[dict]) -> tuple[dict[int, dict], dict[int, int]]:
    """This rank's plans for the epochs the saved ``states`` (every old rank's loader state,
    in rank order) were in, and the samples left of each epoch, over all ranks."""
    if not states or [s["rank"] for s in states] != list(range(states[0]["world"])):
        raise DataError(
            "an elastic resume needs the data position of every rank of the checkpoint, in "
            f"rank order; got ranks {[s.get('rank') for s in states]}"
        )
    now = layout(stream)
    for s in states:
        check_layout(s.get("layout"), now)
    epochs = [s["epoch"] for s in states]
    plans, left = {}, {}
    readers = stream.world * max(1, stream.data.num_workers)
    for epoch in range(min(epochs), max(epochs) + 1):
        rest, n = epoch_plans(stream, states, epoch)
        salt = mix_seed(n, epoch, 29)
        if stream.data.resampled:
            plans[epoch] = {"pieces": None, "take": -(-n // readers), "salt": salt}
        else:
            mine = [pieces[stream.rank :: stream.world] for pieces in rest]
            plans[epoch] = {"pieces": mine, "take": None, "salt": salt}
        left[epoch] = n
    return plans, left
