"""Evaluation sets embedded as streams, split over the ranks of a job.

A set is a list of units read in order (shards, or chunks of image files:
:mod:`dist_contrast.data.evalsets`), decoded without augmentation (shorter side to the model's
size, centre crop, normalised as in training) and embedded in batches of ``eval.batch_size``
under the training precision. Rank ``r`` of ``W`` reads units ``r, r + W, r + 2W, ...``; what it
keeps are features (``eval.feature_dtype``), never pixels, so memory is bounded by a batch plus
the features, not by the set. Every sample carries its global position (unit, index in the
unit): gathered features are put back in that order, so what is computed from them does not
depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from dist_contrast import distributed
from dist_contrast.config import DataConfig
from dist_contrast.data.augment import Normalize, resize_view
from dist_contrast.data.decode import SkipSample, decode_or_count
from dist_contrast.data.evalsets import Unit, unit_samples
from dist_contrast.data.tario import Faults
from dist_contrast.errors import DataError
from dist_contrast.eval.memory import DiskRows, Rows, release_freed_memory

FEATURE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNIT_STRIDE = 1 << 32  # position = unit index * UNIT_STRIDE + index in the unit

TextFn = Callable[[list[str]], torch.Tensor]
ImageFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def towers_fn(towers: dict[str, nn.Module]) -> ImageFn:
    """An :data:`ImageFn` running each of ``towers`` (in eval mode) on the same images."""
    for t in towers.values():
        t.eval()
    return lambda x: {name: t(x) for name, t in towers.items()}


@dataclass
class Embedded:
    """Features of a set (this rank's share, or all of it once :meth:`gathered`)."""

    feats: dict[str, torch.Tensor | DiskRows]  # DiskRows: past embed_set's memory_mb
    labels: torch.Tensor
    captions: list[str | None]
    order: torch.Tensor
    faults: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def gathered(self) -> Embedded:
        """Every rank's rows, in the set's own order (on every rank)."""
        if not distributed.multi_rank():
            return self
        dev = distributed.device()
        order = distributed.all_gather_no_grad(self.order.to(dev)).cpu()
        perm = order.argsort()
        labels = distributed.all_gather_no_grad(self.labels.to(dev)).cpu()[perm]
        feats = {
            k: distributed.all_gather_no_grad(v[0 : len(v)].to(dev)).cpu()[perm]
            for k, v in self.feats.items()
        }
        captions = [c for part in _gather_objects(self.captions) for c in part]
        return Embedded(feats, labels, [captions[i] for i in perm.tolist()], order[perm])


def _gather_objects(obj) -> list:
    import torch.distributed as dist

    parts: list = [None] * distributed.world_size()
    dist.all_gather_object(parts, obj)
    return parts


def my_units(units: Sequence[Unit]) -> list[tuple[int, Unit]]:
    """This rank's share of ``units`` (with their indices): every W-th from its rank."""
    r, w = (distributed.rank(), distributed.world_size()) if distributed.is_dist() else (0, 1)
    return [(i, u) for i, u in enumerate(units) if i % w == r]


def _samples(units, data: DataConfig, require_caption: bool, limit: int, faults: Faults):
    """(position, uint8 view, label, caption) of this rank's units, at most ``limit`` (0: all)."""
    n = 0
    for index, unit in units:
        pos = 0
        for sample in unit_samples(unit, faults):
            dec = decode_or_count(sample, faults, data.max_image_pixels, require_caption)
            if dec is None:
                continue
            try:
                view = resize_view(dec.image, data.image_size, data.channels)
            except SkipSample as skip:  # pixels that fail to decode past the header
                faults.add(skip.reason, f"{sample.get('__url__')}:{sample.get('__key__')}: {skip}")
                continue
            yield index * UNIT_STRIDE + pos, view, dec.label, dec.caption
            pos, n = pos + 1, n + 1
            if limit and n >= limit:
                return


def _batches(stream: Iterator, size: int) -> Iterator[list[tuple]]:
    """Batches of ``size`` items that never span two units: a sample is embedded in the
    same batch whichever rank reads its unit, so its features are bit for bit those of any
    other world size (a sample's features move in the last bits with the batch it is in:
    1.2e-6 between a batch of 100 and batches of 1, enough to flip a near tie in kNN)."""
    batch: list[tuple] = []
    for item in stream:
        if batch and item[0] // UNIT_STRIDE != batch[0][0] // UNIT_STRIDE:
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def embed_set(
    units: Sequence[Unit],
    image: ImageFn,
    data: DataConfig,
    *,
    batch_size: int,
    text: TextFn | None = None,
    require_caption: bool = False,
    max_samples: int = 0,
    precision: str = "fp32",
    feature_dtype: str = "fp32",
    device: torch.device | str = "cpu",
    desc: str = "",
    memory_mb: float | None = None,
    spill_dir: str = "",
) -> Embedded:
    """This rank's share of ``units`` through ``image`` (images [B, C, S, S] -> features
    [B, D] by name; :func:`towers_fn`) and, where every sample of a batch has a caption,
    ``text`` (captions -> [B, D]) under the name ``text``. ``max_samples``: at most this many
    samples in all (each rank keeps its first ``ceil(max_samples / W)``). Not gathered: call
    :meth:`Embedded.gathered` where every rank's rows are needed. ``memory_mb``: features
    kept in memory up to this many MB per tower, the rest in a temporary file in ``spill_dir``
    (:class:`~dist_contrast.eval.memory.Rows`; features are then
    :class:`~dist_contrast.eval.memory.DiskRows`, read by slices); None: all in memory."""
    world = distributed.world_size() if distributed.is_dist() else 1
    limit = -(-max_samples // world) if max_samples else 0
    device = torch.device(device)
    norm = Normalize(data.mean, data.std).to(device)
    store = FEATURE_DTYPES[feature_dtype]
    faults = Faults("[eval] ", data.warn_every_s)
    mine = my_units(units)
    parts: dict[str, Rows] = {}
    texts, order, labels = Rows(), Rows(), Rows()
    captions: list[str | None] = []
    bar = _progress(len(mine), desc)
    autocast = _autocast(precision, device)
    done = 0  # units of this rank finished (for the progress bar)
    for batch in _batches(_samples(mine, data, require_caption, limit, faults), batch_size):
        pos, views, labs, caps = zip(*batch, strict=True)
        x = norm(torch.stack(views).to(device))
        with autocast:
            for name, f in image(x).items():
                if name not in parts:
                    budget = None if memory_mb is None else int(memory_mb * (1 << 20))
                    parts[name] = Rows(budget, spill_dir)
                parts[name].append(f.float().to("cpu", store))
            if text is not None and all(c is not None for c in caps):
                texts.append(text(list(caps)).float().to("cpu", store))
        order.append(torch.tensor(pos, dtype=torch.int64))  # tensors, not lists of ints:
        labels.append(torch.tensor(labs, dtype=torch.int64))  # 8 bytes a sample, not ~40
        captions.extend(caps)
        if bar is not None:
            now = sum(1 for i, _ in mine if i < pos[-1] // UNIT_STRIDE)
            bar.update(now - done)
            done = now
    if bar is not None:
        bar.update(len(mine) - done)
        bar.close()
    feats = {k: v.join() for k, v in parts.items()}
    labels_t = labels.join() if len(labels) else torch.empty(0, dtype=torch.int64)
    if text is not None and len(texts) and len(texts) == len(labels_t):
        feats["text"] = texts.join()
    order_t = order.join() if len(order) else torch.empty(0, dtype=torch.int64)
    release_freed_memory()
    return Embedded(feats, labels_t, captions, order_t, dict(faults.seen))


def _autocast(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def _progress(total: int, desc: str):
    if not desc or not distributed.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", dynamic_ncols=True, leave=False)


def check_nonempty(emb: Embedded, what: str) -> None:
    """A set of which no sample could be used is one error, on every rank."""
    n = len(emb)
    if distributed.multi_rank():
        n = int(distributed.all_reduce_sum([float(n)])[0])
    if n == 0:
        raise DataError(f"no usable sample in {what}")
