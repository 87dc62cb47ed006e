"""Pins: a reader of a step directory (``dist-contrast eval``/``export`` while the run goes on)
holds a shared ``flock`` on ``checkpoints/.pins/step_XXXXXXXX`` for as long as it reads; the
trainer's pruning leaves a pinned step for a later save. The kernel drops a lock when its
process ends, however it ends: a killed reader leaves no stale pin."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

PINS = ".pins"


def pin_file(step_dir: Path) -> Path:
    return step_dir.parent / PINS / step_dir.name


@contextlib.contextmanager
def pinned(step_dir: Path) -> Iterator[bool]:
    """Hold ``step_dir``'s pin while the block runs; yields whether it is held (not in a
    folder this user cannot write: nothing prunes that one from here)."""
    path = pin_file(step_dir)
    try:
        path.parent.mkdir(exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 (held for the block)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield True
    finally:
        handle.close()


def is_pinned(step_dir: Path) -> bool:
    """Whether a reader holds ``step_dir``'s pin now."""
    path = pin_file(step_dir)
    if not path.is_file():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def clear_stale(root: Path) -> None:
    """Remove the pins of step directories that are gone and no longer read."""
    folder = root / PINS
    if not folder.is_dir():
        return
    for pin in folder.glob("step_*"):
        if not (root / pin.name).is_dir() and not is_pinned(root / pin.name):
            pin.unlink(missing_ok=True)
