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
    calls = []

    def queue_rows(quick):
        calls.append(quick)
        return iter([{"W": 1, "K_total": 8, "ms": 2 / 3, "ok": True}, {"W": 2, "K_total": 16384}])

    fake.queue_rows = queue_rows
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(bench, "QUEUE_MODULE", fake.__name__)
    rows, error = bench._queue_rows(True)
    assert calls == [True] and error is None and [r["W"] for r in rows] == [1, 2]
    # columns in first-seen order, right-aligned to their widest cell, floats to 3 digits,
    # a key a row lacks left blank
    assert bench._queue_table(rows).splitlines() == [
        "sharded MoCo queue (dist-contrast bench negatives_queue)",
        "W K_total    ms   ok",
        "1       8 0.667 True",
        "2   16384           ",
    ]

    def fail(quick):
        calls.append(quick)
        raise OSError("x")

    fake.queue_rows = fail
    assert bench._queue_rows(False) == (None, "OSError: x") and calls == [True, False]


def test_queue_bench_row_figures(monkeypatch):
    """A row of the queue bench from rank 0's measured times: medians, minima and the three
    ratios recomputed here from the same times (median and mean differ in each)."""
    from dist_contrast_bench import negatives_queue as queue

    sharded, replicated = [0.004, 0.001, 0.002, 0.009], [0.001, 0.002, 0.008, 0.003]
    measured = {"sharded_bytes": 4096, "replicated_bytes": 8192, "negatives_per_query": 2048}
    measured["times"] = {"sharded": sharded, "replicated": replicated}
    monkeypatch.setattr(queue, "_launch", lambda world, threads, result, *a: measured)
    row = queue._run_world(2, 1024, 32, 16, repeats=4, warmup=0)
    assert (row["W"], row["K_shard"], row["K_total"], row["B"], row["D"]) == (2, 1024, 2048, 16, 32)
    assert row["queue_bytes_sharded"] == 4096 and row["queue_bytes_replicated"] == 8192
    assert row["ms_sharded"] == pytest.approx(3.0) and row["ms_replicated"] == pytest.approx(2.5)
    assert (row["ms_min_sharded"], row["ms_min_replicated"]) == pytest.approx((1.0, 1.0))
    assert (row["time_ratio"], row["time_ratio_min"]) == pytest.approx((3.0 / 2.5, 1.0))
    # per-step ratios 4, 0.5, 0.25, 3: their median
    assert row["time_ratio_paired"] == pytest.approx((0.5 + 3) / 2)


def test_summary_takes_the_slowest_rank_and_the_largest_peak():
    """Rows of the tiled-softmax bench from made-up per-rank measurements: each step's time is
    its slowest rank's, then the median (and min) over steps; the peak the largest rank's."""
    from dist_contrast_bench import negatives_report as report

    plan = {"cases": [{"role": "compare", "B": 8, "modes": ["full", "tiled"]}]}
    rank0 = {"times": {"full": [0.001, 0.010, 0.003], "tiled": [0.002, 0.002, 0.002]}}
    rank1 = {"times": {"full": [0.004, 0.002, 0.002], "tiled": [0.001, 0.005, 0.001]}}
    rank0.update(peaks={"full": 3 * 2**20, "tiled": 2**20}, timed_profiled=False)
    rank1.update(peaks={"full": 5 * 2**20, "tiled": None}, timed_profiled=False)
    full, tiled = report._summarise(plan, [[rank0], [rank1]], world=2)
    # full: slowest per step 4, 10, 3 ms; tiled: 2, 5, 2 ms
    assert (full["ms"], full["ms_min"], full["peak_mib"]) == pytest.approx((4.0, 3.0, 5.0))
    assert (tiled["ms"], tiled["ms_min"]) == pytest.approx((2.0, 2.0))
    assert tiled["peak_mib"] is None  # a rank without a figure: no peak, not a partial one
    assert full["B_local"] == 4 and full["timed_steps"] == 3
    assert full["would_need_mib"] == tiled["would_need_mib"] == 4 * 4 * 8 * 3 / 2**20


def test_bench_rejects_bad_arguments(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--world", "3", "--compare", "16", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--series", "a,b", "--out", str(tmp_path / "x.json")])
