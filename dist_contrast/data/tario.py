"""Reading WebDataset tar shards sample by sample, where bad data never stops a run.

A shard that cannot be opened is logged and skipped; a shard that ends early (truncated tar) ends
there, with the samples read so far kept. Each event is counted by reason (:class:`Faults`);
warnings are rate-limited per reason. Local shards are opened only if they are regular files
(checked on the opened descriptor: a FIFO or a device never blocks a reader); ``pipe:``
commands and URLs are opened with webdataset's ``gopen``. A remote shard rides out transient
errors (a refused or reset connection, an empty reply, a stream that breaks off): it is read
again after an exponential backoff (:class:`Retry`), the samples delivered already skipped, so
the samples and their order are those of a read without the fault.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import sys
import tarfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from dist_contrast.files import open_regular

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

    def retrying(self, detail: str) -> None:
        """Say that a remote shard is read again (not a skip: nothing is counted), at most one
        line per ``warn_every_s``, also while muted (a network fault is news, counted data or
        not)."""
        now = time.monotonic()
        last = self._last_warn.get("retry")
        if last is not None and now - last < self.warn_every_s:
            self._suppressed["retry"] = self._suppressed.get("retry", 0) + 1
            return
        more = self._suppressed.pop("retry", 0)
        tail = f" ({more} more retries since the last warning)" if more else ""
        print(
            f"dist-contrast: warning: {self.where}retrying {detail}{tail}",
            file=sys.stderr,
            flush=True,
        )
        self._last_warn["retry"] = now


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


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def open_shard(url: str) -> IO[bytes]:
    """A shard's byte stream: a local regular file (:func:`dist_contrast.files.open_regular`),
    or what webdataset's ``gopen`` opens for a remote URL (:func:`open_url`)."""
    if not is_remote(url):
        return open_regular(url)
    import webdataset as wds  # here, not at the top: exports load without it (decode.py)

    return wds.gopen(open_url(url))


@dataclass(frozen=True)
class Retry:
    """How a remote shard rides out transient errors: up to ``tries`` more reads, the first
    after ``backoff_s`` seconds, each wait twice the last (at most ``cap_s``, +-20% jitter).
    The defaults are those of ``data.remote_retries`` and ``data.remote_backoff_s``."""

    tries: int = 5
    backoff_s: float = 1.0
    cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (0: the first)."""
        return min(self.cap_s, self.backoff_s * 2**attempt) * _JITTER.uniform(0.8, 1.2)


RETRY = Retry()
_JITTER = random.Random()  # its own generator: the data's randomness is untouched

# curl's exit codes a reader meets (`man curl`), to say what failed
CURL_EXIT = {
    6: "could not resolve host",
    7: "could not connect",
    18: "partial file: the transfer broke off",
    22: "HTTP status 400 or above",
    28: "timed out",
    52: "empty reply from the server",
    55: "failed sending",
    56: "failure receiving: connection reset",
}
# exit statuses that retrying cannot change: the command (or we) ended the stream on purpose,
# so the data itself is at fault; a shell's "cannot execute" and "not found"; and a command
# ended by SIGINT, SIGTERM or SIGKILL (as a signal, or a shell's 128 + n): someone is ending the
# job (a rank that gives up on a stalled shard kills its commands), reading again would start
# the command anew and hold the worker, and its rank, past the stop
_FINAL_STATUS = {0, 23, 141, -13, 126, 127, -2, -9, -15, 130, 137, 143}


@dataclass
class _Failure:
    at_open: bool  # before the first member was read
    detail: str
    transient: bool


def _status(stream: Any) -> int | None:
    """Close ``stream`` (a pipe's close waits for its command) and return the command's exit
    status; None for a stream that is no command."""
    if stream is None:
        return None
    with contextlib.suppress(Exception):  # a pipe's close raises on a failed command
        stream.close()
    return getattr(stream, "status", None)


def _failure(url: str, stream: Any, exc: BaseException, at_open: bool) -> _Failure:
    status = _status(stream)
    if status is None:  # a local file, or no command started: what failed stays failed
        return _Failure(at_open, f"{url}: {exc}", False)
    if status in _FINAL_STATUS:
        return _Failure(at_open, f"{url}: {exc}", False)
    curl = url.startswith(("http://", "https://"))  # what gopen opens with curl
    what = f" ({CURL_EXIT[status]})" if curl and status in CURL_EXIT else ""
    # curl retried HTTP's transient statuses (408, 429, 5xx) itself; a status >= 400 is final
    return _Failure(at_open, f"{url}: exit status {status}{what}", not (curl and status == 22))


def _one_read(url: str, skip: int) -> Generator[dict, None, _Failure | None]:
    """One read of a shard: its samples from index ``skip`` on, then None, or the failure
    that ended the read early."""
    stream = None
    try:
        stream = open_shard(url)
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as exc:  # any failure to open is the shard's fault, not the run's
        return _failure(url, stream, exc, at_open=True)
    sample: dict = {}
    index = 0
    try:
        for member in tar:
            parts = split_name(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, ext = parts
            if sample and sample["__key__"] != key:
                if index >= skip:
                    yield sample
                sample, index = {}, index + 1
            if not sample:
                sample = {"__key__": key, "__url__": url}
            sample[ext] = tar.extractfile(member).read()
        tar.close()
        stream.close()  # a pipe's command that failed (a broken-off transfer) raises here
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The sample being read when the shard broke off is incomplete: dropped.
        return _failure(url, stream, exc, at_open=False)
    finally:
        _status(stream)  # closed however the read ends (the consumer may stop early)
    if sample and index >= skip:
        yield sample
    return None


def tar_samples(url: str, faults: Faults, retry: Retry = RETRY) -> Iterator[dict]:
    """The samples of one shard, in file order: dicts of extension -> bytes, plus
    ``__key__`` and ``__url__``. A remote shard whose read fails for a transient reason is
    read again up to ``retry.tries`` times, from where it broke off; local files are read
    once. What is left unread counts as ``unreadable_shard`` (no sample delivered) or
    ``truncated_shard``."""
    delivered, attempt = 0, 0
    while True:
        reading = _one_read(url, delivered)
        try:
            while True:
                try:
                    sample = next(reading)
                except StopIteration as end:
                    failure = end.value
                    break
                delivered += 1
                yield sample
        finally:
            reading.close()  # the stream closed also when the consumer stops early
        if failure is None:
            return
        if not (failure.transient and is_remote(url) and attempt < retry.tries):
            reason = "unreadable_shard" if failure.at_open and not delivered else "truncated_shard"
            faults.add(reason, failure.detail)
            return
        wait = retry.delay(attempt)
        attempt += 1
        faults.retrying(
            f"{failure.detail} (retry {attempt} of {retry.tries} in {wait:.1f} s, "
            f"{delivered} sample(s) read)"
        )
        time.sleep(wait)


def shard_opens(url: str) -> bool:
    """Whether ``url`` opens as a tar with a first member (read once, no further)."""
    stream = None
    try:
        stream = open_shard(url)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            return next(iter(tar), None) is not None
    except Exception:  # noqa: BLE001 (any failure: it does not open)
        return False
    finally:
        _status(stream)
