"""The loss benchmark runs in quick mode and writes its table as JSON (no timed assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_losses", ROOT / "bench" / "losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bench_writes_every_loss(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "losses.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] and result["memory"] and result["command"]
    names = {r["loss"] for r in result["results"]}
    assert {"contrastive", "triplet_all", "supcon", "clip", "siglip", "nce", "byol"} <= names
    assert len(names) == len(bench._cases())
    for row in result["results"]:
        assert row["B"] in (16, 32) and row["ms"] >= row["ms_min"] > 0
        assert row["peak_mib"] is None or row["peak_mib"] >= 0
    assert "median ms" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--losses", "nope", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "a,b", "--out", str(tmp_path / "x.json")])
