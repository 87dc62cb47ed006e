"""Processes a rank would leave behind: what its data loader started.

A worker that reads a ``pipe:`` or ``http://`` shard runs a command (``sh``, ``curl``). When
the loader kills a worker stuck on such a shard, or a stop signal to the whole process group
ends the shell but not what it started, the command lives on, orphaned, until it ends by itself
(minutes, or never). So the processes started while the loader may fork (:func:`marked`) carry
a token in their environment, which their own children inherit, and :func:`end` kills those
still running once the loader is closed (as Jenkins finds a build's processes). Linux only
(``/proc``).
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOKEN_ENV = "DIST_CONTRAST_STARTED_BY"


def new_token() -> str:
    """A token for this process's loader: its pid and a random part."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


@contextmanager
def marked(token: str) -> Iterator[None]:
    """Processes started meanwhile, by any thread, and their children carry ``token``."""
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous


def carrying(token: str, children: bool = True) -> list[int]:
    """The running processes (but this one, and but its own children unless ``children``)
    whose environment holds ``token``."""
    entry = f"{TOKEN_ENV}={token}".encode()
    me, found = os.getpid(), []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for path in proc.iterdir():
        if not path.name.isdigit() or int(path.name) == me:
            continue
        try:
            environ = (path / "environ").read_bytes()
            parent = int((path / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone, or another user's
            continue
        if entry in environ.split(b"\0") and (children or parent != me):
            found.append(int(path.name))
    return found


def end(token: str, children: bool = True) -> list[int]:
    """SIGKILL the processes that carry ``token`` (a blocked SIGTERM would not end them), but
    this process's own children (the loader's workers, which the loader ends) unless
    ``children``; returns their pids. A worker never writes to the run directory, nor does
    what it started: nothing is lost."""
    pids = carrying(token, children)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return pids
