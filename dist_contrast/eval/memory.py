"""Memory of an evaluation held to its live data: rows kept in pages, and freed memory handed
back to the system rather than kept by the C library.

glibc's malloc raises its mmap threshold to the size of each large block freed, so later blocks
of that size come from the heap; what a batch frees between two long-lived blocks then stays
resident, and a process that embeds 200,000 samples ends up holding tens of MB it does not use
(measured with ``dist-contrast bench eval``: docs/benchmarks.md)."""

from __future__ import annotations

import ctypes

import torch


class Rows:
    """Rows of a set appended batch by batch (features, labels, positions), kept in pages of
    :attr:`PAGE_BYTES` and joined once at the end, each page freed as soon as it is copied:
    the peak is the rows plus a page, where a list of batches joined by ``torch.cat`` holds
    them twice (and leaves the allocator a heap of small freed blocks)."""

    PAGE_BYTES = 4 << 20

    def __init__(self) -> None:
        self.pages: list[torch.Tensor] = []
        self.fill = 0  # rows written into the last page

    def __len__(self) -> int:
        return max(0, len(self.pages) - 1) * len(self.pages[0]) + self.fill if self.pages else 0

    def append(self, x: torch.Tensor) -> None:
        at = 0
        while at < len(x):
            if not self.pages or self.fill == len(self.pages[-1]):
                # the batches' freed temporaries between the pages: back to the system
                release_freed_memory()
                rows = max(1, self.PAGE_BYTES // max(1, x[0].nbytes))
                self.pages.append(x.new_empty((rows, *x.shape[1:])))
                self.fill = 0
            page = self.pages[-1]
            n = min(len(x) - at, len(page) - self.fill)
            page[self.fill : self.fill + n] = x[at : at + n]
            self.fill, at = self.fill + n, at + n

    def join(self) -> torch.Tensor:
        """All the rows in one tensor; the pages are gone afterwards."""
        if not self.pages:
            return torch.empty(0, 0)
        out = self.pages[0].new_empty((len(self), *self.pages[0].shape[1:]))
        at = 0
        self.pages.reverse()  # taken from the end: each page dropped once copied
        while self.pages:
            page = self.pages.pop()
            n = len(page) if self.pages else self.fill
            out[at : at + n] = page[:n]
            at += n
            del page
            release_freed_memory()  # a heap page (glibc) would stay resident until the end
        self.fill = 0
        return out


_malloc_trim = None


def release_freed_memory() -> None:
    """Hand memory that freed tensors left with the C library back to the system (glibc's
    ``malloc_trim``): glibc keeps freed heap blocks, so a process's resident memory would stay
    at its peak after large temporary tensors are gone. A no-op without glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
