"""What every shard writer shares: checking and staging the output folder, cutting an index
list into near-equal shards, a shard's size on disk, and moving the finished shards in place
with ``counts.json`` last."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dist_contrast.errors import DataError

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records of 10,240 bytes


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a Path; an error if it exists and is not a directory (nothing is created)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    return out


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out`` (created with its parents), removed on exit.

    Writers put shards here and move them into ``out`` only when all are complete."""
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder '{out}': {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def balanced_chunks(idx: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """``idx`` cut into the fewest chunks of at most ``shard_size``, sizes differing by <= 1.

    Never a small tail shard, so ranks get equal work."""
    return np.array_split(idx, max(1, -(-len(idx) // shard_size)))


def tar_member_bytes(size: int) -> int:
    """Bytes one tar member of ``size`` data bytes takes (header + data padded to a block)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(member_bytes: int) -> int:
    """Size on disk of an uncompressed tar whose members take ``member_bytes`` in all."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def _shard_names(out: Path, split: str) -> Iterable[Path]:
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    return (p for p in out.iterdir() if pattern.fullmatch(p.name))


def commit_shards(tmp: Path, out: Path, counts: dict, merge: bool = False) -> None:
    """Move the shards listed in ``counts`` from ``tmp`` into ``out``, then ``counts.json``.

    With ``merge``, the splits of an existing ``counts.json`` that were not written now are
    kept, and shards of a written split left over from an earlier write (``SPLIT-NNNNNN.tar``
    not in ``counts``) are removed, so a pattern ``SPLIT-*.tar`` matches the new set only."""
    for split in counts:
        for name in counts[split]["shards"]:
            os.replace(tmp / name, out / name)
    merged = dict(counts)
    if merge:
        for split in counts:
            for stale in _shard_names(out, split):
                if stale.name not in counts[split]["shards"]:
                    stale.unlink()
        old = out / "counts.json"
        try:
            previous = json.loads(old.read_text()) if old.is_file() else {}
        except (OSError, ValueError):
            previous = {}
        if isinstance(previous, dict):
            merged = {**{k: v for k, v in previous.items() if k not in counts}, **counts}
    (tmp / "counts.json").write_text(json.dumps(merged, indent=1))
    os.replace(tmp / "counts.json", out / "counts.json")
