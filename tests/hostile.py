"""Hostile and damaged files for the untrusted-input tests: a pickle that runs a command when
it is unpickled without ``weights_only``, flipped bytes, and a manifest rewritten to match
them (what a careful attacker would do, so that only the safe loading stands in the way)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dist_contrast.train import manifest


class Payload:
    """Touches ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch.save file holding the payload beside real tensors."""
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, path)


def reseal(folder: Path) -> None:
    """A manifest of ``folder`` that matches its files again."""
    manifest.write(folder, manifest.hash_files(folder, manifest.files_of(folder)))


def plant_and_reseal(path: Path, marker: Path, folder: Path) -> None:
    plant(path, marker)
    reseal(folder)


def flip(path: Path, n: int = 16) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (its size unchanged)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(min(n, len(data) - mid)):
        data[mid + i] ^= 0xFF
    path.write_bytes(bytes(data))
