"""Reading WebDataset tar shards sample by sample, where bad data never stops a run.

A shard that cannot be opened is logged and skipped; a shard that ends early (truncated tar) ends
there, with the samples read so far kept. Each event is counted by reason (:class:`Faults`);
warnings are rate-limited per reason. Local shards are opened only if they are regular files
(checked on the opened descriptor: a FIFO or a device never blocks a reader); ``pipe:``
commands and URLs are opened with webdataset's ``gopen``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

# WebDataset's naming: the key is the path up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")

# URLs that are not local paths; everything else is a path on this machine.
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")

FAULT_REASONS = (
    "unreadable_shard",
    "truncated_shard",
    "corrupt_image",
    "oversized_image",
    "missing_image",
    "missing_caption",
    "empty_caption",
)


@dataclass
class Faults:
    """Counts of skipped data by reason, with rate-limited warnings."""

    where: str = ""
    warn_every_s: float = 30.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_REASONS, 0))
    muted: bool = False  # while re-reading data whose faults were counted already
    # every fault seen, muted or not, and the detail of the last one, by reason
    seen: dict[str, int] = field(default_factory=dict)
    last: dict[str, str] = field(default_factory=dict)
    _last_warn: dict[str, float] = field(default_factory=dict)
    _suppressed: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        self.seen[reason] = self.seen.get(reason, 0) + 1
        self.last[reason] = detail
        if self.muted:
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        last = self._last_warn.get(reason)
        if last is not None and now - last < self.warn_every_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        more = self._suppressed.pop(reason, 0)
        tail = f" ({more} more since the last warning)" if more else ""
        print(
            f"dist-contrast: warning: {self.where}skipped ({reason}): {detail}{tail}",
            file=sys.stderr,
            flush=True,
        )
        self._last_warn[reason] = now

    def total(self) -> int:
        return sum(self.counts.values())


def split_name(name: str) -> tuple[str, str] | None:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


S3_COMMAND = "aws s3 cp {url} -"  # DIST_CONTRAST_S3_COMMAND overrides it


def open_url(url: str) -> str:
    """What webdataset's ``gopen`` opens for ``url``. Local paths, ``pipe:`` commands,
    ``http(s)://`` (curl), ``gs://`` (gsutil) and ``hf://`` are its own; ``s3://``, which it
    has no handler for, becomes ``pipe:`` + ``$DIST_CONTRAST_S3_COMMAND`` (default ``aws s3 cp
    {url} -``; e.g. ``s5cmd cat {url}`` or ``rclone cat remote:{path}``), ``{url}`` the
    shell-quoted URL and ``{path}`` the part after ``s3://``."""
    if not url.startswith("s3://"):
        return url
    template = os.environ.get("DIST_CONTRAST_S3_COMMAND") or S3_COMMAND
    return "pipe:" + template.format(url=shlex.quote(url), path=shlex.quote(url[5:]))


_KINDS = (
    (stat.S_ISREG, "regular file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is: "regular file", "directory", "FIFO", "character device"..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def open_local(path: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file, checked on the opened descriptor
    (opened without blocking, so a FIFO or a device swapped in after the listing never blocks);
    an :class:`OSError` that says what it is otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({kind_of(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_shard(url: str) -> IO[bytes]:
    """A shard's byte stream: a local regular file (:func:`open_local`), or what webdataset's
    ``gopen`` opens for a remote URL (:func:`open_url`)."""
    if not is_remote(url):
        return open_local(url)
    import webdataset as wds  # here, not at the top: exports load without it (decode.py)

    return wds.gopen(open_url(url))


def shard_opens(url: str) -> bool:
    """Whether ``url`` opens as a tar with a first member (read no further)."""
    stream = None
    try:
        stream = open_shard(url)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            return next(iter(tar), None) is not None
    except Exception:  # noqa: BLE001 (any failure: it does not open)
        return False
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


def tar_samples(url: str, faults: Faults) -> Iterator[dict]:
    """The samples of one shard, in file order: dicts of extension -> bytes, plus
    ``__key__`` and ``__url__``."""
    stream = None
    try:
        stream = open_shard(url)
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as exc:  # any failure to open is the shard's fault, not the run's
        if stream is not None:
            with contextlib.suppress(Exception):  # a pipe's close reports its exit status
                stream.close()
        faults.add("unreadable_shard", f"{url}: {exc}")
        return
    sample: dict = {}
    try:
        with stream, tar:
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The sample being read when the shard broke off is incomplete: dropped.
        faults.add("truncated_shard", f"{url}: {exc}")
        return
    if sample:
        yield sample
