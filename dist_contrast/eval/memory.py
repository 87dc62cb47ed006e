"""Memory of an evaluation held to its live data: rows kept in pages (or, past a budget, in an
unnamed temporary file read back a block at a time), and freed memory handed back to the system
rather than kept by the C library.

glibc's malloc raises its mmap threshold to the size of each large block freed, so later blocks
of that size come from the heap; what a batch frees between two long-lived blocks then stays
resident, and a process that embeds 200,000 samples ends up holding tens of MB it does not use
(measured with ``dist-contrast bench eval``: docs/benchmarks.md)."""

from __future__ import annotations

import ctypes
import os
import tempfile

import torch

from dist_contrast.errors import StorageError


class Rows:
    """Rows of a set appended batch by batch (features, labels, positions), kept in pages of
    :attr:`PAGE_BYTES` and joined once at the end, each page freed as soon as it is copied:
    the peak is the rows plus a page, where a list of batches joined by ``torch.cat`` holds
    them twice (and leaves the allocator a heap of small freed blocks)."""

    PAGE_BYTES = 4 << 20

    def __init__(self, memory_bytes: int | None = None, spill_dir: str = "") -> None:
        """``memory_bytes``: past this many bytes of rows (None: no limit; 0: from the first
        row) the full pages go to an unnamed temporary file in ``spill_dir`` (default: the
        system's temp dir) and one page is kept for the next rows; :meth:`join` then gives a
        :class:`DiskRows`. Nothing is left on disk: the file has no name and is gone with the
        process, even when it is killed."""
        self.pages: list[torch.Tensor] = []
        self.fill = 0  # rows written into the last page
        self.memory_bytes, self.spill_dir = memory_bytes, spill_dir
        self.disk: DiskRows | None = None

    def __len__(self) -> int:
        held = max(0, len(self.pages) - 1) * len(self.pages[0]) + self.fill if self.pages else 0
        return held + (len(self.disk) if self.disk is not None else 0)

    def append(self, x: torch.Tensor) -> None:
        at = 0
        while at < len(x):
            if not self.pages or self.fill == len(self.pages[-1]):
                self._new_page(x)
            page = self.pages[-1]
            n = min(len(x) - at, len(page) - self.fill)
            page[self.fill : self.fill + n] = x[at : at + n]
            self.fill, at = self.fill + n, at + n

    def _new_page(self, x: torch.Tensor) -> None:
        if self.disk is None and self.memory_bytes is not None:
            held = sum(p.nbytes for p in self.pages)
            next_page = self.pages[0].nbytes if self.pages else self.PAGE_BYTES
            if held + next_page > self.memory_bytes:
                self.disk = DiskRows.create(x.shape[1:], x.dtype, self.spill_dir)
        if self.disk is not None and self.pages:
            for page in self.pages:  # full pages to the file; the last one is reused
                self.disk.write(page)
            del self.pages[:-1]
            self.fill = 0
            return
        # the batches' freed temporaries between the pages: back to the system
        release_freed_memory()
        rows = max(1, self.PAGE_BYTES // max(1, x[0].nbytes))
        self.pages.append(x.new_empty((rows, *x.shape[1:])))
        self.fill = 0

    def join(self) -> torch.Tensor | DiskRows:
        """All the rows in one tensor (or, once they went to disk, a :class:`DiskRows`); the
        pages are gone afterwards."""
        if self.disk is not None:
            disk, self.disk = self.disk, None
            if self.pages:
                disk.write(self.pages[-1][: self.fill])
            self.pages, self.fill = [], 0
            release_freed_memory()
            return disk
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


class DiskRows:
    """Rows of one shape and dtype in an unnamed temporary file, read back by slices: what the
    probes use of a tensor (``len``, ``shape``, ``dtype``, ``dim()``, ``x[i:j]``), with memory
    of one slice. Written by :class:`Rows` once its memory budget is passed; the file is closed
    (and its space freed) when the object is dropped."""

    def __init__(self, file, row_shape: torch.Size, dtype: torch.dtype, where: str) -> None:
        self.file, self.where = file, where
        self.row_shape, self.dtype = torch.Size(row_shape), dtype
        self.row_bytes = torch.empty((1, *row_shape), dtype=dtype).nbytes
        self.rows = 0

    @classmethod
    def create(cls, row_shape, dtype: torch.dtype, spill_dir: str = "") -> DiskRows:
        where = spill_dir or tempfile.gettempdir()
        try:
            file = tempfile.TemporaryFile(dir=where, buffering=0)
        except OSError as exc:
            raise _storage_error(where, exc) from None
        return cls(file, row_shape, dtype, where)

    def __len__(self) -> int:
        return self.rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def write(self, rows: torch.Tensor) -> None:
        """Append ``rows`` (a full write, or :class:`StorageError`: a full disk, a file-size
        limit)."""
        if rows.numel() == 0:
            return
        data = memoryview(rows.contiguous().view(torch.uint8).numpy()).cast("B")
        done = 0
        try:
            while done < len(data):
                done += self.file.write(data[done:])
        except OSError as exc:
            raise _storage_error(self.where, exc) from None
        self.rows += len(rows)

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError("DiskRows are read by slices of rows (x[i:j])")
        start, stop, step = index.indices(self.rows)
        if step != 1:
            raise TypeError("DiskRows are read by contiguous slices (x[i:j])")
        out = torch.empty((max(0, stop - start), *self.row_shape), dtype=self.dtype)
        if out.numel() == 0:
            return out
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        offset, done = start * self.row_bytes, 0
        while done < len(buf):
            got = os.preadv(self.file.fileno(), [buf[done:]], offset + done)
            if got == 0:
                raise StorageError(f"features on disk in {self.where}: the file ended early")
            done += got
        return out


def _storage_error(where: str, exc: OSError) -> StorageError:
    return StorageError(
        f"cannot keep evaluation features on disk in {where} ({exc.strerror or exc}): free "
        "space there, set eval.spill_dir to another folder, or raise eval.bank_memory_mb"
    )


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
