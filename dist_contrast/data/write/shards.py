"""Shard writers for user data: an image folder or a CSV of ``path,caption`` -> WebDataset shards.

A write runs in four steps. (1) List the candidate images (sorted folder walk, or CSV rows in
order). (2) Probe each one (size, image header, caption); files that are missing or
unreadable, images over ``max_image_pixels`` (decompression bombs) and names that are not UTF-8
are skipped and reported, never fatal. (3) Number the kept samples 0..N-1 (``json["index"]``,
the same in train and val, as for digits), split them into train/val, and assign them to shards
under the count and byte limits. (4) Worker processes write whole shards from that plan into a
staging folder; the shards are moved in place at the end and ``counts.json`` last. The plan
does not depend on the number of workers and tar headers carry a fixed mtime, so the shards
are byte-for-byte identical whatever ``workers`` is. Steps (1) and the probe of one image live in
:mod:`dist_contrast.data.write.inputs`, step (3) in :mod:`dist_contrast.data.write.plan`;
their names are re-exported here. An output folder that is not empty is refused unless
``ShardOptions.force`` (``--force``).

Each sample holds the image bytes as read (key ``jpg``/``jpeg``/``png``/``webp``, never
re-encoded), ``cls`` when labelled, ``txt`` when it has a non-empty caption, and ``json``
(``index``, ``label``/``class`` when labelled, ``source``: the path as the user gave it).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dist_contrast.data.write.files import check_out_dir, commit_shards, printable, staging_dir
from dist_contrast.data.write.inputs import (
    CSV_COLUMNS,
    IMAGE_EXTS,
    Candidate,
    image_ext,
    list_csv,
    list_folder,
    probe,
)
from dist_contrast.data.write.plan import (
    VAL_SPLIT,
    Sample,
    ShardOptions,
    ShardPlan,
    meta_members,
    plan_shards,
    sample_bytes,
    sample_key,
    split_indices,
)
from dist_contrast.errors import DataError

__all__ = [
    "CSV_COLUMNS",
    "IMAGE_EXTS",
    "TAR_MTIME",
    "VAL_SPLIT",
    "Candidate",
    "Sample",
    "ShardOptions",
    "ShardPlan",
    "WriteResult",
    "image_ext",
    "list_csv",
    "list_folder",
    "meta_members",
    "parallel_map",
    "plan_shards",
    "probe",
    "probe_all",
    "sample_bytes",
    "sample_key",
    "split_indices",
    "write_csv",
    "write_folder",
    "write_samples",
    "write_shard",
]

TAR_MTIME = 946684800  # 2000-01-01 UTC: a fixed header time keeps shards reproducible


@dataclass
class WriteResult:
    """``counts`` as written to ``counts.json``; ``skipped``: (source, reason) per dropped file."""

    counts: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ---- (2) probing all candidates -----------------------------------------------------------


def probe_all(
    candidates: list[Candidate], pmap: Callable, max_pixels: int = ShardOptions.max_image_pixels
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Readable samples of at most ``max_pixels`` pixels numbered 0..N-1 in candidate order,
    and the skipped (source, reason), the source printable (see :func:`printable`)."""
    samples, skipped = [], []
    results = pmap(partial(probe, max_pixels=max_pixels), candidates, desc="probe", unit="img")
    for c, res in zip(candidates, results, strict=True):
        if isinstance(res, str):
            skipped.append((printable(c.source), res))
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
        samples, bad = probe_all(candidates, pmap, opts.max_image_pixels)
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
    out = check_out_dir(out, opts.force)
    return write_samples(list_folder(root), [], out, opts)


def write_csv(
    csv_path: str | Path, out: str | Path, opts: ShardOptions | None = None
) -> WriteResult:
    """Shards of the images listed in a CSV with columns ``path,caption``."""
    opts = opts or ShardOptions()
    opts.validate()
    out = check_out_dir(out, opts.force)
    candidates, skipped = list_csv(csv_path)
    return write_samples(candidates, skipped, out, opts)
