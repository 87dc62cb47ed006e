"""The paged row store of streamed evaluation joins to exactly what torch.cat gives, in memory
or, past its budget, on disk; a failed write is one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dist_contrast.errors import StorageError
from dist_contrast.eval.memory import DiskRows, Rows


@pytest.mark.parametrize("shape", [(16,), ()])
def test_rows_join_equals_cat_across_pages(monkeypatch, shape):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if shape else torch.int64
    row_bytes = torch.empty(1, *shape, dtype=dtype)[0].nbytes
    monkeypatch.setattr(Rows, "PAGE_BYTES", 7 * row_bytes)  # pages of 7 rows
    batches = [torch.randn(n, *shape, generator=g).to(dtype) for n in (5, 1, 9, 7, 3, 14)]
    rows = Rows()
    for i, b in enumerate(batches):
        rows.append(b)
        assert len(rows) == sum(len(x) for x in batches[: i + 1])
    assert len(rows.pages) > 3  # the batches crossed pages
    joined = rows.join()
    assert joined.dtype == dtype and torch.equal(joined, torch.cat(batches))
    assert rows.pages == [] and len(rows) == 0


def test_empty_rows_join_to_an_empty_tensor():
    assert Rows().join().numel() == 0 and len(Rows()) == 0


def _batches(dtype, shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g) * 100).to(dtype) for n in sizes]


@pytest.mark.parametrize(
    "dtype,shape",
    [(torch.float32, (16,)), (torch.float16, (16,)), (torch.bfloat16, (5,)), (torch.int64, ())],
)
@pytest.mark.parametrize("budget_pages", [0, 2])
def test_rows_past_the_budget_go_to_disk_and_read_back_exactly(
    monkeypatch, tmp_path, dtype, shape, budget_pages
):
    row_bytes = torch.empty(1, *shape, dtype=dtype)[0].nbytes
    monkeypatch.setattr(Rows, "PAGE_BYTES", 7 * row_bytes)  # pages of 7 rows
    batches = _batches(dtype, shape, (5, 1, 9, 7, 3, 14, 20))
    rows = Rows(budget_pages * 7 * row_bytes, str(tmp_path))
    for i, b in enumerate(batches):
        rows.append(b)
        assert len(rows) == sum(len(x) for x in batches[: i + 1])
        assert len(rows.pages) <= max(1, budget_pages)  # one page held once on disk
    want = torch.cat(batches)
    disk = rows.join()
    assert isinstance(disk, DiskRows) and rows.pages == []
    assert len(disk) == len(want) and disk.shape == want.shape and disk.dtype == dtype
    assert disk.dim() == want.dim()
    for i, j in [(0, len(want)), (0, 1), (3, 17), (50, 59), (58, 200), (59, 59), (0, 0)]:
        assert torch.equal(disk[i:j], want[i:j]), (i, j)
    assert torch.equal(disk[:], want)
    assert list(tmp_path.iterdir()) == []  # the file has no name: nothing to clean up
    with pytest.raises(TypeError):
        disk[::2]


def test_rows_within_the_budget_stay_in_memory(tmp_path):
    batches = _batches(torch.float32, (8,), (10, 20))
    rows = Rows(16 << 20, str(tmp_path))  # more than a page
    for b in batches:
        rows.append(b)
    joined = rows.join()
    assert isinstance(joined, torch.Tensor) and torch.equal(joined, torch.cat(batches))


FULL_DISK = """
import resource, signal, sys, torch
from dist_contrast.errors import StorageError
from dist_contrast.eval.memory import Rows
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files of at most 1 MiB
rows = Rows(0, sys.argv[1])
try:
    for _ in range(100):  # 100 x 64 KiB of rows: a 4 MiB page written, past the limit
        rows.append(torch.zeros(256, 64))
except StorageError as exc:
    print("StorageError:", exc)
    sys.exit(3)
"""


def test_a_full_disk_while_features_go_to_disk_is_one_clear_error(tmp_path):
    """A real failed write (a file-size limit: EFBIG, as ENOSPC on a full disk) gives one
    StorageError naming the folder and the remedies, and leaves no file behind."""
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    msg = proc.stdout
    assert f"cannot keep evaluation features on disk in {tmp_path} (File too large)" in msg
    assert "eval.spill_dir" in msg and "eval.bank_memory_mb" in msg
    assert list(tmp_path.iterdir()) == []


def test_a_missing_spill_dir_is_one_clear_error(tmp_path):
    rows = Rows(0, str(tmp_path / "absent"))
    with pytest.raises(StorageError, match="absent .No such file or directory"):
        rows.append(torch.zeros(4, 4))
