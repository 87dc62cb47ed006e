"""WebDataset training pipeline: shards -> samples -> views -> batches, resumable exactly.

Each reader (a loader worker of a rank) reads its shards (see ``sources``), mixes sources by
weight, shuffles raw samples in a buffer, skips and counts bad data, crops two views per image
(and optional small crops) and yields full batches. All randomness comes from
(seed, epoch, rank, worker) and, for a sample's crops, its position in the reader's stream.

:class:`TrainLoader` takes batches from the workers in a fixed order (round-robin over the
workers that still have data), whatever order they arrive in, and keeps its position: per worker,
the batches delivered and the raw samples they used. Restored from a checkpoint, each worker
re-reads its raw samples up to that position without decoding them, and the run receives exactly
the batches it would have received without the interruption.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.augment import (
    Crop,
    Normalize,
    crop_views,
    resize_view,
    sample_crop,
)
from dist_contrast.data.decode import Decoded, decode_or_count
from dist_contrast.data.sources import Reader, Source, check_readers, mix
from dist_contrast.data.tario import FAULT_REASONS, Faults, shard_opens, tar_samples
from dist_contrast.data.tokenizer import Tokenizer, tokenizer_for
from dist_contrast.distributed import mix_seed
from dist_contrast.errors import DataError


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


def _read(
    urls: Iterator[str] | list[str],
    faults: Faults,
    source: tuple[str, ...] | None = None,
    limit: int = 0,
    what: str = "",
) -> Iterator[dict]:
    """The samples of ``urls`` in turn. With ``source`` (every shard of the source ``urls``
    come from): after ``limit`` shards in a row that could not be opened (this reader's whole
    share of a pass), and if no shard of ``source`` opens either, a :class:`DataError`
    instead of skipping for ever. A few bad shards among good ones stay skipped and counted."""
    failed = 0
    for url in urls:
        before = faults.seen.get("unreadable_shard", 0)
        yield from tar_samples(url, faults)
        failed = failed + 1 if faults.seen.get("unreadable_shard", 0) > before else 0
        if source is not None and failed >= max(1, limit):
            if not any(shard_opens(u) for u in source):
                raise DataError(
                    f"{what}: none of its {len(source)} shard(s) could be read (the last: "
                    f"{faults.last['unreadable_shard']}); check the URLs, the network and "
                    "the credentials"
                )
            failed = 0  # the source is readable: these shards are bad, skipped and counted


class ReaderStream(IterableDataset):
    """One epoch of one reader's batches, each tagged with its worker, its index and the raw
    position reached; an end marker with the final fault counts closes the epoch."""

    def __init__(
        self,
        sources: list[Source],
        data: DataConfig,
        augment: AugmentConfig,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
    ) -> None:
        self.sources, self.data, self.augment = sources, data, augment
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch = 0
        self.resume: dict[int, dict] = {}  # worker -> {"batch", "raw", "faults"}
        self._tokenizer: Tokenizer | None = None  # built where it is used (in the worker)

    @property
    def tokenizer(self) -> Tokenizer | None:
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.data)
        return self._tokenizer

    def __getstate__(self) -> dict:  # sent to the workers without a built tokenizer
        return {**self.__dict__, "_tokenizer": None}

    def reader(self) -> Reader:
        info = get_worker_info()
        return Reader(
            self.rank, self.world, info.id if info else 0, info.num_workers if info else 1
        )

    def raw_samples(self, reader: Reader, epoch: int, faults: Faults) -> Iterator[dict]:
        d, seed = self.data, self.seed
        streams = []
        for i, src in enumerate(self.sources):
            what = f"data.train_shards[{i}]" if len(self.sources) > 1 else "data.train_shards"
            if d.resampled:  # drawn with replacement: as many failures as the source has shards
                urls: Iterator[str] | list[str] = src.resampled_shards(reader, seed, epoch, i)
                limit = len(src.urls)
            else:  # this reader's share of the epoch, every one of them unreadable
                urls = src.epoch_shards(reader, seed, epoch, i)
                limit = len(urls)
            streams.append(_read(urls, faults, src.urls, limit, what))
        rng = random.Random(mix_seed(seed, epoch, reader.rank, reader.worker, 1))
        samples = mix(streams, [s.weight for s in self.sources], rng)
        if d.shuffle_buffer > 1:
            samples = shuffle_buffer(samples, d.shuffle_buffer, rng)
        if d.resampled:  # an epoch is epoch_samples in all, shared by the readers
            samples = _take(samples, -(-d.epoch_samples // reader.count))
        return samples

    def views(self, dec: Decoded, reader: Reader, epoch: int, pos: int) -> dict[str, Any]:
        a, d = self.augment, self.data
        rng = random.Random(mix_seed(self.seed, epoch, reader.rank, reader.worker, pos, 2))
        w, h = dec.image.size

        def crop(scale: tuple[float, float]) -> Crop:
            return sample_crop(rng, w, h, scale, a.rotation_deg, a.translate, a.flip_prob)

        big = [crop((a.crop_scale_min, a.crop_scale_max)) for _ in range(d.views)]
        small = [crop((a.small_scale_min, a.small_scale_max)) for _ in range(a.small_crops)]
        # one decode for all the crops, at the scale the most demanding one needs
        crops = [(c, d.image_size) for c in big] + [(c, a.small_size) for c in small]
        views = crop_views(dec.image, crops, d.channels, (w, h))
        keys = ("view1", "view2")[: d.views]
        out: dict[str, Any] = dict(zip(keys, views[: len(big)], strict=True))
        if small:
            out["small_crops"] = torch.stack(views[len(big) :])
        out.update(label=dec.label, index=dec.index)
        if dec.caption is not None:
            out["caption"] = dec.caption
            if self.tokenizer is not None:
                out["tokens"] = self.tokenizer.encode(dec.caption)[0]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Epoch after epoch, from ``epoch`` (and this worker's ``resume`` position in it): the
        worker process lives on across epochs."""
        reader = self.reader()
        epoch, start = self.epoch, self.resume.get(reader.worker, {})
        while True:
            yield from self._epoch_items(reader, epoch, start)
            epoch, start = epoch + 1, {}

    def _epoch_items(self, reader: Reader, epoch: int, start: dict) -> Iterator[dict[str, Any]]:
        where = f"[rank {reader.rank} worker {reader.worker}] "
        counts = dict(start.get("faults") or dict.fromkeys(FAULT_REASONS, 0))
        faults = Faults(where, self.data.warn_every_s, counts)
        skip, batch_no = int(start.get("raw", 0)), int(start.get("batch", 0))
        faults.muted = skip > 0  # re-reading what was counted already
        tag = {"_epoch": epoch, "_worker": reader.worker}
        try:
            yield from self._batches(reader, epoch, faults, skip, batch_no, tag)
        except DataError as exc:  # sent as an item: one line in the training process
            yield {**tag, "_error": str(exc)}

    def _batches(self, reader, epoch, faults, skip, batch_no, tag) -> Iterator[dict[str, Any]]:
        pos, items = 0, []
        for sample in self.raw_samples(reader, epoch, faults):
            pos += 1
            if pos <= skip:
                continue
            faults.muted = False
            dec = decode_or_count(
                sample, faults, self.data.max_image_pixels, self.data.require_caption
            )
            if dec is None:
                continue
            try:
                items.append(self.views(dec, reader, epoch, pos))
            except Exception as exc:  # pixels that fail to decode past the header
                faults.add(getattr(exc, "reason", "corrupt_image"), f"{sample['__key__']}: {exc}")
                continue
            if len(items) == self.batch_size:
                yield {
                    **tag,
                    "_batch": batch_no,
                    "_raw": pos,
                    "_faults": dict(faults.counts),
                    **collate(items),
                }
                batch_no, items = batch_no + 1, []
        yield {**tag, "_end": True, "_raw": pos, "_faults": dict(faults.counts)}


def _take(items: Iterator[dict], n: int) -> Iterator[dict]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch. In a loader worker, tensors are stacked straight into shared memory (as
    torch's default_collate does): handing the batch to the training process then copies
    nothing more, where a plain stack is copied once again into shared memory when sent."""
    in_worker = get_worker_info() is not None
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = _stack(values, in_worker)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def _stack(values: list[torch.Tensor], shared: bool) -> torch.Tensor:
    """``torch.stack(values)``; in shared memory if ``shared``. Views whose pixels lie HWC (see
    augment._to_tensor) are stacked HWC, a plain copy, and returned as a [B, C, H, W] view."""
    first = values[0]
    hwc = first.dim() == 3 and first.permute(1, 2, 0).is_contiguous()
    if hwc:
        values = [v.permute(1, 2, 0) for v in values]
        first = values[0]
    if shared:
        storage = first.untyped_storage()._new_shared(len(values) * first.nbytes)
        out = first.new_empty(0).set_(storage).view(len(values), *first.shape)
        out = torch.stack(values, out=out)
    else:
        out = torch.stack(values)
    return out.permute(0, 3, 1, 2) if hwc else out


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(worker_id: int = 0) -> None:
    """In a loader worker: be killed (SIGKILL) when the training process dies, on Linux.

    A rank killed outright (SIGKILL, the OOM killer) cannot close its loader; its workers,
    which hold the stop signals blocked, would otherwise live on, one of them blocked for ever
    flushing batches into a pipe nobody reads (seen: a test job whose stderr never closed)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: nobody would send it
        os._exit(1)


class TrainLoader:
    """This rank's endless stream of training batches, in a fixed order, with a position that
    :meth:`state_dict` saves and :meth:`load_state_dict` restores."""

    def __init__(self, stream: ReaderStream, num_workers: int) -> None:
        self.stream, self.num_workers = stream, num_workers
        self.workers = max(1, num_workers)
        self.epoch, self.next_worker = 0, 0
        self._reset_epoch()
        self.closed_faults = dict.fromkeys(FAULT_REASONS, 0)
        self._it: Iterator[dict[str, Any]] | None = None
        self._pending: dict[tuple[int, int, int], dict] = {}  # (epoch, worker, batch) -> batch
        self._ended: dict[tuple[int, int], dict] = {}  # (epoch, worker) -> end marker

    def _reset_epoch(self) -> None:
        self.pos = {
            w: {"batch": 0, "raw": 0, "faults": dict.fromkeys(FAULT_REASONS, 0)}
            for w in range(self.workers)
        }
        self.done: set[int] = set()

    def faults(self) -> dict[str, int]:
        """Skipped data so far, by reason, for this rank (all epochs)."""
        out = dict(self.closed_faults)
        for p in self.pos.values():
            for k, v in p["faults"].items():
                out[k] = out.get(k, 0) + v
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_worker": self.next_worker,
            "workers": self.workers,
            "pos": self.pos,
            "done": sorted(self.done),
            "closed_faults": self.closed_faults,
            "rank": self.stream.rank,
            "world": self.stream.world,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["workers"], state["world"]) != (self.workers, self.stream.world):
            raise DataError(
                f"the checkpoint's data position is for {state['world']} rank(s) x "
                f"{state['workers']} worker(s), this run has {self.stream.world} x {self.workers}"
            )
        self.epoch, self.next_worker = state["epoch"], state["next_worker"]
        self.pos = {int(k): v for k, v in state["pos"].items()}
        self.done = set(state["done"])
        self.closed_faults = dict(state["closed_faults"])
        self._it, self._pending, self._ended = None, {}, {}  # workers restart from here

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; at its end the epoch's counts are closed and the
        position moves to the start of the next epoch."""
        produced = any(p["batch"] for p in self.pos.values())
        for batch in self._epoch():
            produced = True
            yield batch
        if not produced:
            raise DataError(
                f"rank {self.stream.rank} got no full batch of "
                f"{self.stream.batch_size} samples from its shards in an epoch"
            )
        for p in self.pos.values():
            for k, v in p["faults"].items():
                self.closed_faults[k] = self.closed_faults.get(k, 0) + v
        self.epoch += 1
        self.next_worker = 0
        self._reset_epoch()

    def close(self, grace_s: float = 10.0) -> None:
        """End the workers, whatever state the run is in: asked to stop, joined for up to
        ``grace_s`` seconds, then killed. Idempotent; the next iteration starts new ones.

        The workers hold stop signals blocked (``train.preempt.held``), so torch's own
        SIGTERM at shutdown, and the one multiprocessing sends at interpreter exit before it
        joins its daemonic children for ever, do not reach them: a rank that left by an
        exception with the loader still referenced by the traceback used to hang at exit. A
        worker never writes to the run directory, so SIGKILL loses nothing."""
        it, self._it, self._pending, self._ended = self._it, None, {}, {}
        workers = list(getattr(it, "_workers", ()))
        if not workers:
            return
        deadline = time.monotonic() + grace_s
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ runs
        if shutdown is not None:
            shutdown()  # sets the done event and sends each worker its end marker
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
                w.join()

    def start(self) -> None:
        """Start the workers now, from the current position: they fill their prefetch slots
        while the caller does other set-up, and the first batch is ready when it is asked for.
        A no-op once started (iterating starts them too)."""
        self._items()

    def _items(self) -> Iterator[dict[str, Any]]:
        """The workers' tagged items; one DataLoader whose workers live across epochs,
        (re)started from the current position when needed."""
        if self._it is None:
            self.stream.epoch = self.epoch
            self.stream.resume = {w: p for w, p in self.pos.items() if p["raw"]}
            d = self.stream.data
            extra = (
                {"prefetch_factor": d.prefetch_factor, "worker_init_fn": die_with_parent}
                if self.num_workers
                else {}
            )
            self._it = iter(
                DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, **extra)
            )
        return self._it

    def _epoch(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        w, e = self.next_worker, self.epoch
        while len(self.done) < self.workers:
            if w in self.done:
                w = (w + 1) % self.workers
                continue
            want = (e, w, self.pos[w]["batch"])
            while want not in self._pending and (e, w) not in self._ended:
                item = next(items)
                if "_error" in item:  # a worker found a source it cannot read at all
                    raise DataError(f"[rank {self.stream.rank}] {item['_error']}")
                key = (item["_epoch"], item["_worker"])
                if "_end" in item:
                    self._ended[key] = item
                else:
                    self._pending[(*key, item["_batch"])] = item
            if want in self._pending:
                item = self._pending.pop(want)
                self.pos[w].update(batch=want[2] + 1, raw=item["_raw"], faults=item["_faults"])
                self.next_worker = w = (w + 1) % self.workers
                yield {k: v for k, v in item.items() if not k.startswith("_")}
            else:
                final = self._ended.pop((e, w))
                self.pos[w].update(raw=final["_raw"], faults=final["_faults"])
                self.done.add(w)
                w = (w + 1) % self.workers


def train_loader(
    data: DataConfig, augment: AugmentConfig, batch_size: int, seed: int, rank: int, world: int
) -> TrainLoader:
    from dist_contrast.data.sources import build_sources

    sources = build_sources(data.train_shards, data.train_weights, "data.train_shards")
    check_readers(sources, world, data.num_workers, data.resampled, "data.train_shards")
    stream = ReaderStream(sources, data, augment, batch_size, seed, rank, world)
    return TrainLoader(stream, data.num_workers)


def read_all(urls: list[str], data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every usable sample of ``urls`` in order, resized and normalised: (images, labels)."""
    images, labels, _ = read_captioned(urls, data, require_caption=False)
    return images, labels


def read_captioned(
    urls: list[str], data: DataConfig, require_caption: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Every usable sample of ``urls`` in order (samples without a caption skipped and counted
    when ``require_caption``): (images resized and normalised, labels (-1: none), captions)."""
    faults = Faults("[eval] ", data.warn_every_s)
    norm = Normalize(data.mean, data.std)
    images, labels, captions = [], [], []
    for sample in _read(urls, faults):
        dec = decode_or_count(sample, faults, data.max_image_pixels, require_caption)
        if dec is None:
            continue
        images.append(resize_view(dec.image, data.image_size, data.channels))
        labels.append(dec.label)
        captions.append(dec.caption)
    if not images:
        raise DataError(f"no usable sample in {len(urls)} shard(s): {urls[0]} ...")
    return norm(torch.stack(images)), torch.tensor(labels), captions
