"""The paged row store of streamed evaluation joins to exactly what torch.cat gives."""

from __future__ import annotations

import pytest
import torch

from dist_contrast.eval.memory import Rows


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
