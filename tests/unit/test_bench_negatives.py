"""The tiled-softmax benchmark runs in quick mode on 2 ranks and writes its table, JSON and plot
(no timed assertions); the sharded-queue rows of dist_contrast_bench.negatives_queue are picked
up."""

from __future__ import annotations

import json
import sys
import types

import pytest


def _bench():
    from dist_contrast_bench import negatives

    return negatives


def test_quick_bench_writes_both_paths(tmp_path, capsys):
    bench = _bench()
    out, plot = tmp_path / "negatives.json", tmp_path / "memory.png"
    assert bench.main(["--quick", "--no-queue", "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["device"] and result["memory"] and result["command"]
    rows = result["results"]
    compare = {r["path"]: r for r in rows if r["role"] == "compare"}
    assert set(compare) == {"full", "tiled"} and compare["full"]["B"] == 256
    large = [r for r in rows if r["role"] == "large"]
    assert [(r["B"], r["path"]) for r in large] == [(1024, "tiled")]
    for r in rows:
        assert r["B_local"] * 2 == r["B"] and r["ms"] >= r["ms_min"] > 0
        assert r["peak_mib"] is None or r["peak_mib"] > 0
        assert r["would_need_mib"] == 4 * r["B_local"] * r["B"] * 3 / 2**20
    acc = result["acceptance"]
    for key in ("memory_ratio", "time_ratio", "large_extra_gib", "memory_ok", "time_ok"):
        assert key in acc
    assert acc["time_ratio"] == pytest.approx(compare["tiled"]["ms"] / compare["full"]["ms"])
    if result["plot"]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["queue"] is None
    printed = capsys.readouterr().out
    assert "median ms" in printed and "would need" in printed


def test_queue_rows_come_from_the_queue_bench(monkeypatch):
    bench = _bench()
    assert bench.QUEUE_MODULE == "dist_contrast_bench.negatives_queue"
    fake = types.ModuleType("fake_negatives_queue")
    fake.queue_rows = lambda quick: [
        {"W": 1, "K_total": 8, "ms": 1.5, "quick": quick},
        {"W": 2, "K_total": 16},
    ]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(bench, "QUEUE_MODULE", fake.__name__)
    rows, error = bench._queue_rows(True)
    assert error is None and rows[0]["quick"] is True and len(rows) == 2
    table = bench._queue_table(rows)
    assert "K_total" in table and "16" in table.splitlines()[-1]

    def fail(quick):
        raise OSError("x")

    fake.queue_rows = fail
    assert bench._queue_rows(False) == (None, "OSError: x")


def test_bench_rejects_bad_arguments(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--world", "3", "--compare", "16", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--series", "a,b", "--out", str(tmp_path / "x.json")])
