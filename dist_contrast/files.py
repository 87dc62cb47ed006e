"""Opening a file that may be damaged or hostile: only a regular file is read.

A FIFO would block its reader until someone writes to it, a device (``/dev/zero``) never ends,
a directory is no file. :func:`open_regular` opens without blocking and checks the opened
descriptor (not the path: a file swapped for a FIFO between a check and the open is still
caught), optionally without following a link. Shards, configs, checkpoint files, manifests and
``init_from`` folders are all opened through it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_KINDS = (
    (stat.S_ISREG, "regular file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


class NotRegularFile(OSError):
    """A path that is there but is no regular file (a FIFO, a device, a directory, a link
    where links are not followed)."""


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is: "regular file", "directory", "FIFO", "character device"..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, follow_links: bool = True) -> BinaryIO:
    """``path`` opened for reading (binary, blocking once open) if it is a regular file; a
    :class:`NotRegularFile` naming what it is otherwise, the usual :class:`OSError` if it
    cannot be opened. ``follow_links=False``: a symbolic link is refused too."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_links and os.path.islink(path):
            raise NotRegularFile(f"not a regular file (a symbolic link): {path}") from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"not a regular file ({kind_of(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def require_regular(path: str | os.PathLike) -> None:
    """:func:`open_regular` and close: for a reader that takes a path (safetensors' mmap)."""
    open_regular(Path(path)).close()


@contextlib.contextmanager
def read_errors(
    path: str | os.PathLike, error: Callable[[str], Exception], what: str = "file"
) -> Iterator[None]:
    """Inside it, a missing file, a path that is no regular file and any other failure to read
    ``path`` become ``error`` (a one-line user error naming ``what`` and the path)."""
    try:
        yield
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except NotRegularFile:
        raise error(f"{what} {path} is not a regular file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
