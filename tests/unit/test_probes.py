"""The kNN and linear probes a block of the bank at a time (in memory or read back from disk)
equal the whole-bank computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_contrast.eval import probes
from dist_contrast.eval.memory import DiskRows, Rows


def _clusters(n: int, m: int, dim: int, classes: int, seed: int):
    """``n`` training and ``m`` test rows around the same ``classes`` random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n + m,), generator=g)
    x = centres[labels] + 0.8 * torch.randn(n + m, dim, generator=g)
    return x[:n], labels[:n], x[n:], labels[n:]


def naive_knn_top1(bank, bank_labels, queries, labels, k, temperature) -> float:
    """The whole similarity matrix at once, each query's k best rows voting exp(sim / T)."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    top, idx = sim.topk(k, dim=1)
    classes = int(max(bank_labels.max(), labels.max())) + 1
    votes = torch.zeros(len(queries), classes).scatter_add_(
        1, bank_labels[idx], (top / temperature).exp()
    )
    return float((votes.argmax(1) == labels).double().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_knn_in_bank_blocks_equals_the_whole_matrix(monkeypatch, dtype):
    bank, bank_y, queries, query_y = _clusters(3000, 700, 16, 10, 0)
    bank = bank.to(dtype)
    want = naive_knn_top1(bank, bank_y, queries, query_y, 20, 0.07)
    assert 0.3 < want < 1.0  # neither trivial nor hopeless
    assert probes.knn_top1(bank, bank_y, queries, query_y, 20, 0.07) == want
    # 16-d fp32 rows: 450 of them a block -> 7 blocks, merged top k
    monkeypatch.setattr(probes, "BANK_BLOCK_BYTES", 450 * 16 * 4)
    assert probes.knn_top1(bank, bank_y, queries, query_y, 20, 0.07, chunk=128) == want


def test_knn_with_fewer_rows_in_a_block_than_k(monkeypatch):
    bank, bank_y, queries, query_y = _clusters(205, 50, 8, 4, 2)
    want = naive_knn_top1(bank, bank_y, queries, query_y, 20, 0.07)
    monkeypatch.setattr(probes, "BANK_BLOCK_BYTES", 100 * 8 * 4)  # blocks of 100, 100, 5
    assert probes.knn_top1(bank, bank_y, queries, query_y, 20, 0.07) == want


def test_knn_among_tied_similarities_ignores_the_bank_order(monkeypatch):
    """Rows at exactly the same cosine to a query (here scaled copies of a few directions, as
    a collapsed tower gives) are chosen by label, not by position: the vote is the same for
    any order of the bank, in blocks or whole, and for one fixed order the naive top k can
    cut the ties elsewhere."""
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(3, 8, generator=g)
    pick = torch.randint(0, 3, (300,), generator=g)
    bank = directions[pick] * torch.randint(1, 4, (300, 1), generator=g).float()
    bank_y = torch.randint(0, 5, (300,), generator=g)
    queries, query_y = directions + 0.01 * torch.randn(3, 8, generator=g), torch.arange(3)
    want = probes.knn_top1(bank, bank_y, queries, query_y, 20, 0.07)
    votes = set()
    for seed in range(6):
        order = torch.randperm(300, generator=torch.Generator().manual_seed(seed))
        assert probes.knn_top1(bank[order], bank_y[order], queries, query_y, 20, 0.07) == want
        votes.add(naive_knn_top1(bank[order], bank_y[order], queries, query_y, 20, 0.07))
    monkeypatch.setattr(probes, "BANK_BLOCK_BYTES", 40 * 8 * 4)  # 8 blocks, merged
    assert probes.knn_top1(bank.flip(0), bank_y.flip(0), queries, query_y, 20, 0.07) == want
    assert len(votes) > 1  # the ties are real: cut by position, the figure moves


def test_knn_keys_keep_similarity_bits_and_order():
    sim = torch.tensor([[float("-inf"), -2.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, float("inf")]])
    labels = torch.tensor([[0, 3, 1, 2, 5, 7, 9, 0, (1 << 24) - 1]])
    keys = probes._keys(sim, labels)
    assert bool((keys[0, 1:] > keys[0, :-1]).all())
    back, back_labels = probes._unkey(keys)
    assert torch.equal(back.view(torch.int32), sim.view(torch.int32))
    assert torch.equal(back_labels, labels)
    same = probes._keys(torch.tensor([[0.5, 0.5]]), torch.tensor([[2, 1]]))
    assert same[0, 1] > same[0, 0]  # at equal similarity the smaller label ranks first


def test_linear_probe_in_blocks_fits_the_same_model(monkeypatch):
    x, y, xv, yv = _clusters(1200, 300, 12, 6, 4)
    w1, b1, mean1, std1 = probes._fit_linear(x, y, 6, 1e-3, 200)
    whole = probes.linear_probe_top1(x, y, xv, yv)
    monkeypatch.setattr(probes, "PROBE_BLOCK_BYTES", 100 * 12 * 8)  # 12 blocks of 100 rows
    w2, b2, mean2, std2 = probes._fit_linear(x, y, 6, 1e-3, 200)
    torch.testing.assert_close(mean2, mean1, rtol=0, atol=1e-12)
    torch.testing.assert_close(std2, std1, rtol=0, atol=1e-12)
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(b2, b1, rtol=0, atol=1e-6)
    assert probes.linear_probe_top1(x, y, xv, yv) == whole
    assert 0.5 < whole <= 1.0


def test_unit_rows_equals_normalize_bit_for_bit():
    x = torch.randn(64, 9) * 5
    x[3] = 0  # a zero row stays zero, as with F.normalize
    assert torch.equal(probes.unit_rows(x), F.normalize(x, dim=1))
    assert torch.equal(probes.unit_rows(x.half()), F.normalize(x.half().float(), dim=1))
    assert x.abs().sum() > 0 and probes.unit_rows(x) is not x  # the input is left alone
    buf = torch.empty(64 * 9)
    into = probes.unit_rows(x.half(), out=buf.view(64, 9))
    assert torch.equal(into, F.normalize(x.half().float(), dim=1))
    assert into.data_ptr() == buf.data_ptr()  # written where it was asked


def _on_disk(x: torch.Tensor, tmp_path) -> DiskRows:
    rows = Rows(0, str(tmp_path))
    rows.append(x)
    disk = rows.join()
    assert isinstance(disk, DiskRows)
    return disk


@pytest.mark.parametrize("blocks", [1, 7])
def test_probes_on_a_bank_on_disk_give_the_same_numbers(monkeypatch, tmp_path, blocks):
    """The bank read back from its temporary file a block at a time: kNN top-1 equal, the
    linear probe's fit equal bit for bit, in one block or several."""
    bank, bank_y, queries, query_y = _clusters(2100, 500, 12, 8, 6)
    bank = bank.half()
    disk = _on_disk(bank, tmp_path)
    if blocks > 1:
        monkeypatch.setattr(probes, "BANK_BLOCK_BYTES", 300 * 12 * 4)
        monkeypatch.setattr(probes, "PROBE_BLOCK_BYTES", 300 * 12 * 8)
    assert probes.knn_top1(disk, bank_y, queries, query_y) == probes.knn_top1(
        bank, bank_y, queries, query_y
    )
    for got, want in zip(
        probes._fit_linear(disk, bank_y, 8, 1e-3, 50),
        probes._fit_linear(bank, bank_y, 8, 1e-3, 50),
        strict=True,
    ):
        assert torch.equal(got, want)
