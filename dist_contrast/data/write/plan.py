"""Shard options and the shard plan: global sample numbering, train/val split, shard cuts.

Step (3) of :mod:`dist_contrast.data.write.shards`. The plan depends only on the samples and the
options (never on the number of workers), which keeps the shards byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_contrast.data.write.files import balanced_chunks, tar_file_bytes, tar_member_bytes
from dist_contrast.data.write.inputs import MAX_IMAGE_PIXELS
from dist_contrast.errors import DataError

VAL_SPLIT = "val"


@dataclass(frozen=True)
class ShardOptions:
    """How to cut the samples into shards (the CLI's options); ``max_image_pixels``: larger
    images are skipped; ``force``: write into a folder that is not empty (replacing the shards
    of the splits written)."""

    prefix: str = "train"
    shard_size: int = 1000
    max_shard_bytes: float | None = None
    val_fraction: float = 0.0
    seed: int = 0
    workers: int = 1
    progress: bool = True
    max_image_pixels: int = MAX_IMAGE_PIXELS
    force: bool = False

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise DataError(f"prefix '{self.prefix}' must be letters, digits, '-' or '_'")
        if self.val_fraction and self.prefix == VAL_SPLIT:
            raise DataError(f"prefix '{VAL_SPLIT}' is taken by the validation split")
        if self.shard_size <= 0:
            raise DataError(f"shard size must be > 0 (got {self.shard_size})")
        if self.max_shard_bytes is not None and not 0 < self.max_shard_bytes < math.inf:
            raise DataError(f"max shard bytes must be > 0 (got {self.max_shard_bytes})")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"validation fraction must be in [0, 1) (got {self.val_fraction})")
        if self.workers <= 0:
            raise DataError(f"workers must be > 0 (got {self.workers})")
        if self.max_image_pixels <= 0:
            raise DataError(f"max image pixels must be > 0 (got {self.max_image_pixels})")


@dataclass(frozen=True)
class Sample:
    """A probed, readable image with its global index."""

    index: int
    path: str
    source: str
    ext: str
    size: int
    label: int | None
    class_name: str | None
    caption: str | None


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    samples: tuple[Sample, ...]


# ---- (3) split and plan --------------------------------------------------------------------


def split_indices(labels: list[int | None], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices per split. Stratified per label when every sample has one; fixed by ``seed``."""
    n = len(labels)
    if fraction == 0:
        return {"train": np.arange(n)}
    rng = np.random.default_rng(seed)
    arr = np.array([-1 if lab is None else lab for lab in labels])
    groups = [np.flatnonzero(arr == lab) for lab in np.unique(arr)]
    val = np.concatenate(
        [rng.permutation(g)[: int(np.floor(fraction * len(g) + 0.5))] for g in groups]
    )
    if len(val) == 0 or len(val) == n:
        raise DataError(f"validation fraction {fraction} of {n} samples leaves a split empty")
    return {"train": np.setdiff1d(np.arange(n), val), VAL_SPLIT: np.sort(val)}


def sample_key(split: str, s: Sample) -> str:
    return f"{split}-{s.index:06d}"


def meta_members(s: Sample) -> dict[str, bytes]:
    """The members of a sample other than its image: ``cls``, ``txt``, ``json``."""
    meta: dict[str, Any] = {"index": s.index}
    members = {}
    if s.label is not None:
        members["cls"] = str(s.label).encode()
        meta["label"] = s.label
        meta["class"] = s.class_name
    if s.caption:
        members["txt"] = s.caption.encode("utf-8")
    meta["source"] = s.source
    members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return members


def sample_bytes(s: Sample) -> int:
    sizes = [s.size] + [len(v) for v in meta_members(s).values()]
    return sum(tar_member_bytes(n) for n in sizes)


def _cut_by_bytes(chunk: list[Sample], limit: float | None) -> Iterator[list[Sample]]:
    cur: list[Sample] = []
    used = 0
    for s in chunk:
        b = sample_bytes(s)
        if limit is not None and tar_file_bytes(b) > limit:
            raise DataError(
                f"'{s.source}' ({s.size} bytes) does not fit in a shard of "
                f"--max-shard-bytes {limit:.0f}"
            )
        if cur and limit is not None and tar_file_bytes(used + b) > limit:
            yield cur
            cur, used = [], 0
        cur.append(s)
        used += b
    if cur:
        yield cur


def plan_shards(
    samples: list[Sample], splits: dict[str, np.ndarray], opts: ShardOptions
) -> list[ShardPlan]:
    """Shards of near-equal sample count (at most ``shard_size``), each cut further where it
    would pass ``max_shard_bytes``. Named ``<split>-NNNNNN.tar``; train takes ``opts.prefix``."""
    plans = []
    for split, idx in splits.items():
        name = opts.prefix if split == "train" else split
        pieces = [
            piece
            for chunk in balanced_chunks(idx, opts.shard_size)
            for piece in _cut_by_bytes([samples[i] for i in chunk], opts.max_shard_bytes)
        ]
        plans += [ShardPlan(f"{name}-{k:06d}.tar", name, tuple(p)) for k, p in enumerate(pieces)]
    return plans
