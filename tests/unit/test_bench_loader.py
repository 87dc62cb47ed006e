"""The loader benchmark runs in quick mode and writes both pipelines' rows (no timed assertions)."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
from PIL import Image


def _bench():
    from dist_contrast_bench import loader

    return loader


def test_quick_bench_writes_both_pipelines_per_worker_count(tmp_path, capsys):
    bench = _bench()
    out, data = tmp_path / "x.json", tmp_path / "shards"
    argv = ["--quick", "--images", "28", "--shard-size", "7", "--image-size", "32"]
    argv += ["--batch-size", "4", "--shuffle-buffer", "8", "--workers", "0,2"]
    assert bench.main([*argv, "--data", str(data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"] and result["torch"] and "--quick" in result["command"]
    rows = {(r["pipeline"], r["workers"]): r for r in result["results"]}
    assert set(rows) == {(p, w) for p in ("ours", "baseline") for w in (0, 2)}
    for (pipeline, workers), row in rows.items():
        # 4 shards of 7 samples, full batches of 4: one reader of 28, or two of 14 (12 used)
        assert row["samples_timed"] == (28 if workers == 0 else 24)
        assert row["samples_per_s"] > 0
        assert (row["ours_over_baseline"] is None) == (pipeline == "baseline")
    aug = result["device_augment"]
    assert aug["batch_size"] == 4 and aug["ms_per_batch"] > 0
    printed = capsys.readouterr().out
    assert "ours/base" in printed and "per-pixel ops" in printed

    # the shards written there are reused: the same samples, nothing rewritten
    shards = sorted(data.glob("train-*.tar"))
    assert len(shards) == 4
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        im = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
    assert names[:3] == ["00000000.jpg", "00000000.cls", "00000000.json"]
    assert im.format == "JPEG" and im.size == (256, 256)
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert bench.main([*argv, "--data", str(data), "--out", str(out), "--repeats", "1"]) == 0
    assert [p.stat().st_mtime_ns for p in shards] == mtimes


def test_baseline_crop_box_follows_random_resized_crop():
    bench = _bench()
    rng = random.Random(0)
    for _ in range(500):
        left, top, right, bottom = bench.rrc_box(rng, 256, 192)
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 256 and bottom <= 192
        assert 0.08 * 256 * 192 * 0.9 <= w * h <= 256 * 192
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # a strip no crop of that aspect fits into: the centre crop clamped to the aspect range
    assert bench.rrc_box(random.Random(0), 1000, 10) == (493, 0, 506, 10)


def test_bench_rejects_bad_arguments(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--workers", "a", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):  # 2 shards cannot feed 4 workers
        bench.main(["--images", "20", "--shard-size", "10", "--workers", "4"])
