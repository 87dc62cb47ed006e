"""The loss benchmark runs in quick mode and writes its table as JSON (no timed assertions)."""

from __future__ import annotations

import json

import pytest


def _bench():
    from dist_contrast_bench import losses

    return losses


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


def test_cli_runs_a_benchmark_by_name_and_lists_them(tmp_path, capsys):
    """``dist-contrast bench NAME`` imports dist_contrast_bench.NAME; a helper module or an
    unknown name is refused with the benchmarks (modules with ``main``) listed."""
    from dist_contrast.cli import main

    out = tmp_path / "losses.json"
    assert main(["bench", "losses", "--quick", "--losses", "ntxent,clip", "--out", str(out)]) == 0
    assert {r["loss"] for r in json.loads(out.read_text())["results"]} == {"ntxent", "clip"}
    for name in ("common", "nope", "../losses"):
        capsys.readouterr()
        assert main(["bench", name]) == 2
        err = capsys.readouterr().err
        assert f"no benchmark '{name}'" in err
        listed = err.split("available: ", 1)[1].rstrip(")\n").split(", ")
        assert {"losses", "loader", "negatives", "negatives_queue", "quality", "gpu"} <= set(listed)
        assert not {"common", "loader_data", "loader_pipelines", "negatives_report"} & set(listed)
