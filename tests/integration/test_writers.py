"""Shard writers for an image folder and a CSV: content, determinism, limits, splits, errors.

Shards are read back with Python's tarfile (not with the writer's code), and every image is
compared byte for byte with the file it came from."""

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_contrast.data.write import shards as writers
from dist_contrast.data.write.shards import ShardOptions, write_csv, write_folder
from dist_contrast.errors import DataError

from conftest import run_cli

CLASSES = ["cat", "dog", "emu"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def _save(path: Path, rng: np.random.Generator) -> None:
    side = int(rng.integers(8, 24))
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=FORMATS[path.suffix.lower().lstrip(".")])


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """3 classes x 8 images in all four formats (one upper-case suffix, one in a sub-folder)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "classes"
    exts = ["png", "jpg", "jpeg", "webp"]
    for c in CLASSES:
        for i in range(8):
            _save(root / c / f"{i:02d}.{exts[i % 4]}", rng)
    _save(root / "dog" / "nested" / "deep.PNG", rng)
    (root / "cat" / "notes.md").write_text("not an image, ignored")
    (root / "emu" / "03.txt").write_text("an emu, with a caption\n")
    return root


def _read(out: Path) -> dict[str, list[tuple[str, str, dict[str, bytes]]]]:
    """split -> [(shard, key, {ext: bytes})] in file order, from counts.json's shard list."""
    counts = json.loads((out / "counts.json").read_text())
    result = {}
    for split, info in counts.items():
        rows = []
        for shard, n in info["shards"].items():
            samples: dict[str, dict[str, bytes]] = {}
            with tarfile.open(out / shard) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
            assert len(samples) == n, (shard, len(samples), n)
            rows += [(shard, key, s) for key, s in samples.items()]
        assert len(rows) == info["samples"]
        result[split] = rows
    return result


def _image(sample: dict[str, bytes]) -> tuple[str, bytes]:
    (ext,) = [e for e in sample if e in ("png", "jpg", "jpeg", "webp")]
    return ext, sample[ext]


def test_class_folder_same_shards_for_1_and_2_workers(class_folder, tmp_path):
    out1, out2 = tmp_path / "w1", tmp_path / "w2"
    opts = ShardOptions(shard_size=4, val_fraction=0.25, seed=3, workers=1, progress=False)
    result = write_folder(class_folder, out1, opts)
    proc = run_cli(
        "shards", "folder", str(class_folder), "--out", str(out2), "--shard-size", "4",
        "--val-fraction", "0.25", "--seed", "3", "--workers", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "train: 19 samples in 5 shard(s)" in proc.stdout
    assert "val: 6 samples in 2 shard(s)" in proc.stdout
    assert result.skipped == []
    names = sorted(os.listdir(out1))
    assert names == sorted(os.listdir(out2))  # no staging folder left behind
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name

    shards = _read(out1)
    samples = [s for rows in shards.values() for _, _, s in rows]
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["index"] for m in metas) == list(range(25))
    for s, meta in zip(samples, metas, strict=True):
        src = class_folder / meta["source"]
        ext, data = _image(s)
        assert data == src.read_bytes()  # copied, not re-encoded
        assert ext == src.suffix.lower().lstrip(".")
        assert meta["class"] == src.relative_to(class_folder).parts[0]
        assert meta["label"] == CLASSES.index(meta["class"]) == int(s["cls"])
        caption = "an emu, with a caption" if meta["source"] == "emu/03.webp" else None
        assert (s["txt"].decode() if "txt" in s else None) == caption
    # global index follows the sorted walk: classes in order, files sorted within
    by_index = sorted(metas, key=lambda m: m["index"])
    assert [m["source"] for m in by_index[:3]] == ["cat/00.png", "cat/01.jpg", "cat/02.jpeg"]
    assert by_index[8]["source"] == "dog/00.png" and by_index[16]["source"] == "dog/nested/deep.PNG"
    # stratified: 2 of 8 (or 9) per class held out
    val_labels = sorted(json.loads(s["json"])["label"] for _, _, s in shards["val"])
    assert val_labels == [0, 0, 1, 1, 2, 2]


def test_csv_with_captions_skips_missing_and_unreadable(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    for i in range(6):
        _save(data / "img" / f"{i}.jpg", rng)
    (data / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    absolute = tmp_path / "elsewhere" / "abs.webp"
    _save(absolute, rng)
    rows = [
        ("img/0.jpg", "a red square"),
        ("img/missing.jpg", "lost"),
        ("img/1.jpg", 'with "quotes", commas'),
        (str(absolute), "ünïcödé ✓ 中文"),
        ("img/broken.png", "corrupt"),
        ("img/2.jpg", ""),
    ] + [(f"img/{i}.jpg", f"caption {i}") for i in range(3, 6)]
    with open(data / "list.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "extra"])
        w.writerows([(p, c, "x") for p, c in rows])

    out = tmp_path / "out"
    proc = run_cli("shards", "csv", str(data / "list.csv"), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "train: 7 samples in 1 shard(s)" in proc.stdout
    assert "dist-contrast: warning: skipped 2 of 9 file(s)" in proc.stderr
    assert "img/missing.jpg: no such file" in proc.stderr
    assert "img/broken.png: not a readable image" in proc.stderr

    (rows_read,) = _read(out).values()
    kept = [r for r in rows if r[1] not in ("lost", "corrupt")]
    assert len(rows_read) == len(kept)
    for (shard, _, s), (path, caption) in zip(rows_read, kept, strict=True):
        meta = json.loads(s["json"])
        assert meta["source"] == path and "label" not in meta and "cls" not in s
        full = Path(path) if os.path.isabs(path) else data / path
        assert _image(s)[1] == full.read_bytes()
        assert (s["txt"].decode("utf-8") if "txt" in s else "") == caption
        assert shard == "train-000000.tar"
    assert [json.loads(s["json"])["index"] for _, _, s in rows_read] == list(range(7))


def test_caption_folder_and_stale_shards(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "pics"
    for i in range(10):
        _save(root / f"{i}.png", rng)
        (root / f"{i}.txt").write_text(f"picture number {i}\n", encoding="utf-8")
    out = tmp_path / "out"
    opts = ShardOptions(prefix="pics", shard_size=2, progress=False)
    assert len(write_folder(root, out, opts).counts["pics"]["shards"]) == 5
    json_before = json.loads((out / "counts.json").read_text())
    # rewriting with bigger shards drops the old shards of that prefix, keeps other entries
    (out / "counts.json").write_text(json.dumps({"other": {"samples": 0, "shards": {}}}))
    opts = ShardOptions(prefix="pics", shard_size=100, progress=False, force=True)
    result = write_folder(root, out, opts)
    assert sorted(os.listdir(out)) == ["counts.json", "pics-000000.tar"]
    counts = json.loads((out / "counts.json").read_text())
    assert counts == {"other": {"samples": 0, "shards": {}}, **result.counts}
    assert json_before["pics"]["samples"] == 10
    for _, _, s in _read(out)["pics"]:
        i = json.loads(s["json"])["index"]
        assert s["txt"].decode() == f"picture number {i}"
        assert _image(s)[1] == (root / f"{i}.png").read_bytes()


def test_size_limits(class_folder, tmp_path):
    by_count = write_folder(
        class_folder, tmp_path / "n", ShardOptions(shard_size=7, progress=False)
    )
    sizes = list(by_count.counts["train"]["shards"].values())
    assert sizes == [7, 6, 6, 6]  # near-equal, never a small tail shard

    limit = 2 * 10240  # about 5 of these small images
    opts = ShardOptions(shard_size=7, max_shard_bytes=limit, progress=False)
    counts = write_folder(class_folder, tmp_path / "b", opts).counts
    files = [tmp_path / "b" / name for name in counts["train"]["shards"]]
    assert len(files) > 4 and all(f.stat().st_size <= limit for f in files)
    assert max(counts["train"]["shards"].values()) <= 7
    assert sum(counts["train"]["shards"].values()) == 25
    # the planner's size is the size tarfile writes: shards are filled, not just under the limit
    assert max(f.stat().st_size for f in files) > limit - 10240

    with pytest.raises(DataError, match=r"does not fit in a shard of --max-shard-bytes 4000"):
        write_folder(class_folder, tmp_path / "c", ShardOptions(max_shard_bytes=4000))


def test_val_split_is_deterministic_and_stratified(class_folder, tmp_path):
    def val_sources(seed, fraction=0.5, name="x"):
        out = tmp_path / f"{name}{seed}"
        opts = ShardOptions(val_fraction=fraction, seed=seed, progress=False)
        write_folder(class_folder, out, opts)
        return sorted(json.loads(s["json"])["source"] for _, _, s in _read(out)["val"])

    first, again, other = val_sources(0), val_sources(0, name="y"), val_sources(1)
    assert first == again and first != other
    per_class = [sum(src.startswith(c + "/") for src in first) for c in CLASSES]
    assert per_class == [4, 5, 4]  # dog has 9 images: 4.5 rounds up
    with pytest.raises(DataError, match="leaves a split empty"):
        val_sources(0, fraction=0.01, name="z")


def test_a_failed_write_leaves_the_previous_shards(class_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_folder(class_folder, out, ShardOptions(shard_size=10, progress=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    calls, real_write_shard = [], writers.write_shard

    def fail_on_second(plan, tmp):
        calls.append(plan.name)
        if len(calls) == 2:
            raise DataError("disk full")
        return real_write_shard(plan, tmp)

    monkeypatch.setattr(writers, "write_shard", fail_on_second)
    with pytest.raises(DataError, match="disk full"):
        write_folder(class_folder, out, ShardOptions(shard_size=3, progress=False, force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _one_clear_line(proc, expected):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dist-contrast: error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_errors_for_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_caption.csv").write_text("path,label\na.jpg,1\n")
    (tmp_path / "a_file").write_text("x")
    _one_clear_line(
        run_cli("shards", "folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
        "no images (.jpg/.jpeg/.png/.webp) found in",
    )
    _one_clear_line(
        run_cli("shards", "csv", str(tmp_path / "no_caption.csv"), "--out", str(tmp_path / "o")),
        "has no column 'caption' (needs a header row with path,caption; found path,label)",
    )
    _one_clear_line(
        run_cli("shards", "folder", str(tmp_path), "--out", str(tmp_path / "a_file")),
        "exists and is not a directory",
    )
    assert not (tmp_path / "o").exists()


def test_more_bad_input(tmp_path):
    rng = np.random.default_rng(3)
    _save(tmp_path / "mixed" / "top.png", rng)
    _save(tmp_path / "mixed" / "sub" / "x.png", rng)
    with pytest.raises(DataError, match="holds both images and sub-folders"):
        write_folder(tmp_path / "mixed", tmp_path / "o")
    (tmp_path / "all_missing.csv").write_text("path,caption\nnope.jpg,a\ngone.png,b\n")
    with pytest.raises(DataError, match="none of the 2 images could be read .*'nope.jpg': no such"):
        write_csv(tmp_path / "all_missing.csv", tmp_path / "o", ShardOptions(progress=False))
    (tmp_path / "header_only.csv").write_text("path,caption\n")
    with pytest.raises(DataError, match="has a header but no rows"):
        write_csv(tmp_path / "header_only.csv", tmp_path / "o")
    with pytest.raises(DataError, match="CSV file .* does not exist"):
        write_csv(tmp_path / "nope.csv", tmp_path / "o")
    for bad, match in [
        (dict(prefix="a.b"), "prefix 'a.b' must be"),
        (dict(val_fraction=0.1, prefix="val"), "taken by the validation split"),
        (dict(val_fraction=1.0), r"validation fraction must be in \[0, 1\)"),
        (dict(shard_size=0), "shard size must be > 0"),
        (dict(workers=0), "workers must be > 0"),
        (dict(max_image_pixels=0), "max image pixels must be > 0"),
    ]:
        with pytest.raises(DataError, match=match):
            write_folder(tmp_path / "mixed" / "sub", tmp_path / "o", ShardOptions(**bad))
    assert not (tmp_path / "o").exists()


def test_images_decode_from_shards(class_folder, tmp_path):
    """What the loader does with a sample: PIL opens the image bytes of every format."""
    write_folder(class_folder, tmp_path / "out", ShardOptions(progress=False))
    for _, _, s in _read(tmp_path / "out")["train"]:
        with Image.open(io.BytesIO(_image(s)[1])) as im:
            assert im.size[0] >= 8
