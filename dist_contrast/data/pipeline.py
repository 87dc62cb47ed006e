"""WebDataset training pipeline: shards -> samples -> views -> batches, resumable exactly.

Each reader (a loader worker of a rank) reads its shards (see ``sources``), mixes sources by
weight, shuffles raw samples in a buffer, skips and counts bad data, crops two views per image
(and optional small crops) and yields full batches. All randomness comes from
(seed, epoch, rank, worker) and, for a sample's crops, its position in the reader's stream.

Each batch is tagged with its worker, index and raw position, so that the loader
(:mod:`dist_contrast.data.loader`) can deliver them in a fixed order and resume exactly. In an
epoch with a *plan* (the rest of an epoch after an elastic resume, see
:mod:`dist_contrast.data.position`), a reader reads the shards dealt to it instead, skipping
the samples consumed before; its generators are salted by the plan.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.augment import (
    Crop,
    Normalize,
    crop_views,
    resize_view,
    sample_crop,
)
from dist_contrast.data.decode import Decoded, SkipSample, decode_or_count, oriented_size
from dist_contrast.data.sources import Reader, Source, mix
from dist_contrast.data.tario import (
    FAULT_REASONS,
    RETRY,
    Faults,
    Retry,
    shard_opens,
    tar_samples,
)
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
    skip: dict[str, set[int]] | None = None,
    retry: Retry | None = None,
) -> Iterator[dict]:
    """The samples of ``urls`` in turn, each with its ``__index__`` in its shard, those of
    ``skip`` (shard -> indices) left out; remote shards retried as ``retry`` says (default:
    :data:`~dist_contrast.data.tario.RETRY`). With ``source`` (every shard of the source
    ``urls`` come from): after ``limit`` shards in a row that could not be opened (this
    reader's whole share of a pass), and if no shard of ``source`` opens either, a
    :class:`DataError` instead of skipping for ever. A few bad shards among good ones stay
    skipped and counted."""
    failed = 0
    for url in urls:
        before = faults.seen.get("unreadable_shard", 0)
        drop = skip.get(url, ()) if skip else ()
        for i, sample in enumerate(tar_samples(url, faults, retry or RETRY)):
            if i not in drop:
                sample["__index__"] = i
                yield sample
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
        self.plans: dict[int, dict] = {}  # epoch -> this rank's share of it (elastic resume)
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

    def raw_samples(
        self, reader: Reader, epoch: int, faults: Faults, plan: dict | None = None
    ) -> Iterator[dict]:
        """The reader's raw samples of ``epoch``, mixed and shuffled; with ``plan``, its
        rank's share of the rest of an epoch (elastic resume) instead of the epoch's shards."""
        d, seed = self.data, self.seed
        salt = () if plan is None else (plan["salt"],)
        streams = []
        for i, src in enumerate(self.sources):
            what = f"data.train_shards[{i}]" if len(self.sources) > 1 else "data.train_shards"
            skip = None
            if d.resampled:  # drawn with replacement: as many failures as the source has shards
                urls: Iterator[str] | list[str] = src.resampled_shards(
                    reader, seed, epoch, i, *salt
                )
                limit = len(src.urls)
            elif plan is not None:  # the shards dealt to this reader, less what was consumed
                pieces = plan["pieces"][i][reader.worker :: reader.workers]
                urls, skip = [u for u, _ in pieces], {u: set(s) for u, s in pieces}
                limit = len(urls)
            else:  # this reader's share of the epoch, every one of them unreadable
                urls = src.epoch_shards(reader, seed, epoch, i)
                limit = len(urls)
            streams.append(_read(urls, faults, src.urls, limit, what, skip, retry_of(d)))
        rng = random.Random(mix_seed(seed, epoch, reader.rank, reader.worker, 1, *salt))
        samples = mix(streams, [s.weight for s in self.sources], rng)
        if d.shuffle_buffer > 1:
            samples = shuffle_buffer(samples, d.shuffle_buffer, rng)
        if d.resampled:  # an epoch is epoch_samples in all, shared by the readers
            take = -(-d.epoch_samples // reader.count) if plan is None else plan["take"]
            samples = _take(samples, take)
        return samples

    def views(self, dec: Decoded, reader: Reader, epoch: int, pos: int) -> dict[str, Any]:
        a, d = self.augment, self.data
        rng = random.Random(mix_seed(self.seed, epoch, reader.rank, reader.worker, pos, 2))
        w, h = oriented_size(dec.image)  # as the views will see it (EXIF orientation)

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

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch; its token rows cut after the batch's last end-of-text
        (:meth:`Tokenizer.trim`): the text tower's cost follows the captions' length, not the
        context length, and its features are the same."""
        batch = collate(items)
        if "tokens" in batch and self.tokenizer is not None:
            batch["tokens"] = self.tokenizer.trim(batch["tokens"])
        return batch

    def _batches(self, reader, epoch, faults, skip, batch_no, tag) -> Iterator[dict[str, Any]]:
        pos, items = 0, []
        for sample in self.raw_samples(reader, epoch, faults, self.plans.get(epoch)):
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
                items.append({**self.views(dec, reader, epoch, pos), "key": sample["__key__"]})
            except Exception as exc:  # pixels that fail to decode past the header
                faults.add(getattr(exc, "reason", "corrupt_image"), f"{sample['__key__']}: {exc}")
                continue
            if len(items) == self.batch_size:
                yield {
                    **tag,
                    "_batch": batch_no,
                    "_raw": pos,
                    "_faults": dict(faults.counts),
                    **self._collate(items),
                }
                batch_no, items = batch_no + 1, []
        tail = [it["key"] for it in items]  # the partial batch, dropped
        yield {**tag, "_end": True, "_raw": pos, "_faults": dict(faults.counts), "_tail": tail}


def retry_of(data: DataConfig) -> Retry:
    """How remote shards are retried under ``data``."""
    return Retry(data.remote_retries, data.remote_backoff_s)


def _take(items: Iterator[dict], n: int) -> Iterator[dict]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch. In a loader worker, tensors are stacked straight into shared memory (as
    torch's default_collate does): handing the batch to the training process then copies
    nothing more, where a plain stack is copied once again into shared memory when sent.

    A field that only some samples have (a caption: the shard writers leave out an empty one)
    is a list with None where a sample has none, or, if it is a tensor or a number (token ids
    of a caption), left out of the batch: a method that needs it skips such samples before
    (``data.require_caption``)."""
    in_worker = get_worker_info() is not None
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for it in items for k in it):  # every key, first seen first
        values = [it.get(key) for it in items]
        first = next((v for v in values if v is not None), None)
        if not isinstance(first, (torch.Tensor, int)):
            out[key] = values
        elif all(v is not None for v in values):
            out[key] = _stack(values, in_worker) if torch.is_tensor(first) else torch.tensor(values)
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


def read_captioned(
    urls: list[str], data: DataConfig, require_caption: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Every usable sample of ``urls`` in order (samples without a caption skipped and counted
    when ``require_caption``): (images resized and normalised, labels (-1: none), captions)."""
    faults = Faults("[eval] ", data.warn_every_s)
    norm = Normalize(data.mean, data.std)
    images, labels, captions = [], [], []
    for sample in _read(urls, faults, retry=retry_of(data)):
        dec = decode_or_count(sample, faults, data.max_image_pixels, require_caption)
        if dec is None:
            continue
        try:
            images.append(resize_view(dec.image, data.image_size, data.channels))
        except SkipSample as skip:  # pixels that fail to decode past the header
            faults.add(skip.reason, f"{sample['__url__']}:{sample['__key__']}: {skip}")
            continue
        labels.append(dec.label)
        captions.append(dec.caption)
    if not images:
        raise DataError(f"no usable sample in {len(urls)} shard(s): {urls[0]} ...")
    return norm(torch.stack(images)), torch.tensor(labels), captions
