"""The tiled-softmax benchmark runs in quick mode on 2 ranks and writes its table, JSON and plot
(no timed assertions); the sharded-queue rows of bench/negatives_queue.py are picked up."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_negatives", ROOT / "bench" / "negatives.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_queue_rows_come_from_the_queue_bench(tmp_path, monkeypatch):
    bench = _bench()
    (tmp_path / "negatives_queue.py").write_text(
        "def queue_rows(quick):\n"
        "    return [{'W': 1, 'K_total': 8, 'ms': 1.5, 'quick': quick}, {'W': 2, 'K_total': 16}]\n"
    )
    monkeypatch.setattr(bench, "HERE", tmp_path)
    rows, error = bench._queue_rows(True)
    assert error is None and rows[0]["quick"] is True and len(rows) == 2
    table = bench._queue_table(rows)
    assert "K_total" in table and "16" in table.splitlines()[-1]
    (tmp_path / "negatives_queue.py").write_text("def queue_rows(quick):\n    raise OSError('x')\n")
    assert bench._queue_rows(False) == (None, "OSError: x")


def test_bench_rejects_bad_arguments(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--world", "3", "--compare", "16", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--series", "a,b", "--out", str(tmp_path / "x.json")])
