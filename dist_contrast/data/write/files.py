"""What every shard writer shares: checking and staging the output folder, cutting an index
list into near-equal shards, a shard's size on disk, moving the finished shards in place with
``counts.json`` last, and showing a file name that is not UTF-8."""

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


STAGING_PREFIX = ".tmp-"  # + the writer's pid: the staging folder inside the output folder


def printable(name: str) -> str:
    """``name`` as it can be printed and written: the bytes of a file name that are not UTF-8
    (held as surrogates by Python) shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _staging(name: str) -> bool:
    return re.fullmatch(rf"{re.escape(STAGING_PREFIX)}\d+", name) is not None


def _some(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(printable(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_out_dir(out: str | Path, force: bool = False) -> Path:
    """``out`` as a Path; an error if it exists and is not a directory, or (unless ``force``)
    holds anything but the staging folders of writers (nothing is created).

    With ``force`` the write replaces the shards of the splits it writes (see
    :func:`commit_shards`); other files stay."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    if not force and out.is_dir():
        held = sorted(n for n in os.listdir(out) if not _staging(n))
        if held:
            raise DataError(
                f"output folder '{out}' is not empty ({_some(held)}): choose another --out, or "
                "pass --force to replace the shards of the splits written now"
            )
    return out


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out`` (created with its parents), removed on exit.

    Writers put shards here and move them into ``out`` only when all are complete."""
    tmp = out / f"{STAGING_PREFIX}{os.getpid()}"
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
