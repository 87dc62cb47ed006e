"""Shard writers for user data: an image folder or a CSV of ``path,caption`` -> WebDataset shards.

A write runs in four steps. (1) List the candidate images (sorted folder walk, or CSV rows in
order). (2) Probe each one (size, image header, caption); files that are missing or unreadable
are skipped and reported, never fatal. (3) Number the kept samples 0..N-1 (``json["index"]``,
the same in train and val, as for digits), split them into train/val, and assign them to shards
under the count and byte limits. (4) Worker processes write whole shards from that plan into a
staging folder; the shards are moved in place at the end and ``counts.json`` last. The plan
does not depend on the number of workers and tar headers carry a fixed mtime, so the shards
are byte-for-byte identical whatever ``workers`` is.

Each sample holds the image bytes as read (key ``jpg``/``jpeg``/``png``/``webp``, never
re-encoded), ``cls`` when labelled, ``txt`` when it has a non-empty caption, and ``json``
(``index``, ``label``/``class`` when labelled, ``source``: the path as the user gave it).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dist_contrast.data.shards import (
    balanced_chunks,
    check_out_dir,
    commit_shards,
    staging_dir,
    tar_file_bytes,
    tar_member_bytes,
)
from dist_contrast.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VAL_SPLIT = "val"
TAR_MTIME = 946684800  # 2000-01-01 UTC: a fixed header time keeps shards reproducible
CSV_COLUMNS = ("path", "caption")


@dataclass(frozen=True)
class ShardOptions:
    """How to cut the samples into shards (the CLI's options)."""

    prefix: str = "train"
    shard_size: int = 1000
    max_shard_bytes: float | None = None
    val_fraction: float = 0.0
    seed: int = 0
    workers: int = 1
    progress: bool = True

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


@dataclass(frozen=True)
class Candidate:
    """An image to probe: where to read it and what the data set says about it."""

    path: str
    source: str
    label: int | None = None
    class_name: str | None = None
    caption: str | None = None
    caption_path: str | None = None


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


@dataclass
class WriteResult:
    """``counts`` as written to ``counts.json``; ``skipped``: (source, reason) per dropped file."""

    counts: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)


def image_ext(name: str) -> str | None:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return ext if ext in IMAGE_EXTS else None


# ---- (1) listing the candidates ------------------------------------------------------------


def _visible(names: Sequence[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _images_under(top: Path) -> list[Path]:
    """Images anywhere below ``top``, sorted; hidden files and folders are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = _visible(dirnames)
        found += [Path(dirpath, f) for f in _visible(filenames) if image_ext(f)]
    return sorted(found)


def _candidate(path: Path, root: Path, **labels: Any) -> Candidate:
    side = path.with_suffix(".txt")
    return Candidate(
        path=str(path),
        source=path.relative_to(root).as_posix(),
        caption_path=str(side) if side.is_file() else None,
        **labels,
    )


def list_folder(root: str | Path) -> list[Candidate]:
    """``root/<class>/**/*.jpg`` (label = index of the sorted class name) or ``root/*.jpg``
    with optional ``x.txt`` captions beside ``x.jpg`` (no label)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    entries = _visible(os.listdir(root))
    top = [root / n for n in entries if image_ext(n) and (root / n).is_file()]
    classes = [n for n in entries if (root / n).is_dir()]
    if top and classes:
        raise DataError(
            f"image folder '{root}' holds both images and sub-folders: use either "
            "ROOT/<class>/*.jpg (labelled) or ROOT/*.jpg with x.txt captions"
        )
    if top:
        found = [_candidate(p, root) for p in top]
    else:
        found = [
            _candidate(p, root, label=k, class_name=name)
            for k, name in enumerate(classes)
            for p in _images_under(root / name)
        ]
    if not found:
        exts = "/".join(f".{e}" for e in IMAGE_EXTS)
        raise DataError(f"no images ({exts}) found in '{root}'")
    return found


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            return header, list(reader)
    except UnicodeDecodeError:
        raise DataError(f"CSV '{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"cannot read CSV '{path}': {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise DataError(f"CSV '{path}' line {reader.line_num}: {exc}") from None


def list_csv(csv_path: str | Path) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Rows of a CSV with a header and columns ``path,caption`` (others are ignored).

    Relative paths are taken from the CSV's folder. Rows with an empty path are skipped."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"CSV file '{path}' does not exist")
    header, rows = _read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        found = ",".join(header) if header else "nothing"
        raise DataError(
            f"CSV '{path}' has no column {', '.join(repr(c) for c in missing)} "
            f"(needs a header row with {','.join(CSV_COLUMNS)}; found {found})"
        )
    if not rows:
        raise DataError(f"CSV '{path}' has a header but no rows")
    found, skipped = [], []
    for line, row in enumerate(rows, start=2):
        src = (row.get("path") or "").strip()
        if not src:
            skipped.append((f"{path.name} line {line}", "empty path"))
            continue
        full = Path(src) if os.path.isabs(src) else path.parent / src
        found.append(Candidate(path=str(full), source=src, caption=row.get("caption") or ""))
    return found, skipped


# ---- (2) probing ---------------------------------------------------------------------------


def probe(c: Candidate) -> tuple[int, str | None] | str:
    """(size, caption) for a readable image, else the reason it is skipped."""
    from PIL import Image, UnidentifiedImageError

    if image_ext(c.path) is None:
        return f"not a {'/'.join(IMAGE_EXTS)} file"
    try:
        size = os.path.getsize(c.path)
        with Image.open(c.path):  # reads the header only
            pass
        caption = c.caption
        if c.caption_path is not None:
            caption = Path(c.caption_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return "no such file"
    except UnidentifiedImageError:
        return "not a readable image"
    except UnicodeDecodeError:
        return "caption file is not UTF-8"
    except OSError as exc:
        return exc.strerror or str(exc)
    return size, (caption.strip() if caption else None)


def probe_all(
    candidates: list[Candidate], pmap: Callable
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Readable samples numbered 0..N-1 in candidate order, and the skipped (source, reason)."""
    samples, skipped = [], []
    results = pmap(probe, candidates, desc="probe", unit="img")
    for c, res in zip(candidates, results, strict=True):
        if isinstance(res, str):
            skipped.append((c.source, res))
            continue
        size, caption = res
        samples.append(
            Sample(
                index=len(samples),
                path=c.path,
                source=c.source,
                ext=image_ext(c.path),
                size=size,
                label=c.label,
                class_name=c.class_name,
                caption=caption,
            )
        )
    return samples, skipped


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


# ---- (4) writing ---------------------------------------------------------------------------


def write_shard(plan: ShardPlan, tmp: str) -> int:
    """Write one planned shard into ``tmp``; the number of samples written."""
    import webdataset as wds

    with wds.TarWriter(str(Path(tmp) / plan.name), encoder=False, mtime=TAR_MTIME) as w:
        for s in plan.samples:
            try:
                data = Path(s.path).read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read '{s.source}': {exc.strerror or exc}") from None
            if len(data) != s.size:
                raise DataError(f"'{s.source}' changed while the shards were written")
            w.write({"__key__": sample_key(plan.split, s), s.ext: data, **meta_members(s)})
    return len(plan.samples)


@contextmanager
def parallel_map(workers: int, progress: bool) -> Iterator[Callable]:
    """``pmap(fn, items, desc, unit, weight=None)``: ``[fn(x) for x in items]`` in order, on a
    process pool when ``workers > 1``, with a progress bar on stderr advancing by ``weight(x)``.
    """
    from tqdm import tqdm

    methods = mp.get_all_start_methods()
    pool = (
        mp.get_context("fork" if "fork" in methods else None).Pool(workers) if workers > 1 else None
    )

    def pmap(
        fn: Callable, items: list, desc: str, unit: str, weight: Callable | None = None
    ) -> list:
        weights = [weight(x) for x in items] if weight else [1] * len(items)
        chunk = 1 if weight else max(1, min(64, len(items) // (4 * workers)))
        it = pool.imap(fn, items, chunksize=chunk) if pool else map(fn, items)
        out = []
        with tqdm(total=sum(weights), desc=desc, unit=unit, disable=not progress) as bar:
            for w, res in zip(weights, it, strict=True):
                out.append(res)
                bar.update(w)
        return out

    try:
        yield pmap
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def write_samples(
    candidates: list[Candidate],
    skipped: list[tuple[str, str]],
    out: Path,
    opts: ShardOptions,
) -> WriteResult:
    """Steps (2)-(4) for listed candidates; ``skipped`` are drops found while listing."""
    with parallel_map(opts.workers, opts.progress) as pmap:
        samples, bad = probe_all(candidates, pmap)
        skipped = skipped + bad
        if not samples:
            src, why = skipped[0]
            raise DataError(
                f"none of the {len(skipped)} images could be read (first: '{src}': {why})"
            )
        splits = split_indices([s.label for s in samples], opts.val_fraction, opts.seed)
        plans = plan_shards(samples, splits, opts)
        with staging_dir(out) as tmp:
            written = pmap(
                partial(write_shard, tmp=str(tmp)),
                plans,
                "write",
                "img",
                weight=lambda p: len(p.samples),
            )
            counts: dict = {}
            for plan, n in zip(plans, written, strict=True):
                entry = counts.setdefault(plan.split, {"samples": 0, "shards": {}})
                entry["samples"] += n
                entry["shards"][plan.name] = n
            commit_shards(tmp, out, counts, merge=True)
    return WriteResult(counts, skipped)


def write_folder(
    root: str | Path, out: str | Path, opts: ShardOptions | None = None
) -> WriteResult:
    """Shards of an image folder (class sub-folders, or images with ``x.txt`` captions)."""
    opts = opts or ShardOptions()
    opts.validate()
    out = check_out_dir(out)
    return write_samples(list_folder(root), [], out, opts)


def write_csv(
    csv_path: str | Path, out: str | Path, opts: ShardOptions | None = None
) -> WriteResult:
    """Shards of the images listed in a CSV with columns ``path,caption``."""
    opts = opts or ShardOptions()
    opts.validate()
    out = check_out_dir(out)
    candidates, skipped = list_csv(csv_path)
    return write_samples(candidates, skipped, out, opts)
