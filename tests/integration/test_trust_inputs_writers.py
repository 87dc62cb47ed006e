"""The shard writers on hostile input: a decompression bomb and a file or folder
named in bytes that are not UTF-8 are skipped and reported, not fatal; a second write into a
folder that holds shards is refused unless --force; the Makefile's digits rule works on a
fresh clone and after an interrupted write. Everything through the real CLI (and ``make``)."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, cli_env, run_cli


def png_bytes(rng: np.random.Generator, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int) -> bytes:
    """A valid PNG of ``side`` x ``side`` black 1-bit pixels: a few kB on disk (the rows are
    zeros, compressed), ``side**2`` pixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + the packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def write(path: Path | bytes, data: bytes) -> None:
    """Write ``data`` at ``path`` (bytes: a name that need not be UTF-8), folders made."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def samples(out: Path) -> dict[str, list[dict]]:
    """split -> the json member of each sample, read back with tarfile."""
    counts = json.loads((out / "counts.json").read_text())
    found: dict[str, list[dict]] = {}
    for split, info in counts.items():
        for shard in info["shards"]:
            with tarfile.open(out / shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        found.setdefault(split, []).append(json.load(tar.extractfile(m)))
    return found


def warning_lines(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return [line.strip() for line in proc.stderr.splitlines() if line.startswith(("dist", "  "))]


@pytest.mark.parametrize("workers", [1, 2])
def test_decompression_bombs_are_skipped_and_reported(tmp_path, workers):
    rng = np.random.default_rng(0)
    root = tmp_path / "classes"
    for c in ("cat", "dog"):
        for i in range(4):
            write(root / c / f"{i:02d}.png", png_bytes(rng))
    write(root / "cat" / "bomb.png", bomb_png(30000))  # 9e8 pixels: past PIL's own limit
    write(root / "dog" / "big.png", bomb_png(10000))  # 1e8 pixels: past the default 64e6
    assert (root / "cat" / "bomb.png").stat().st_size < 200_000
    out = tmp_path / "out"
    proc = run_cli("shards", "folder", str(root), "--out", str(out), "--workers", str(workers))
    lines = warning_lines(proc)
    assert "train: 8 samples in 1 shard(s)" in proc.stdout
    assert lines[0].startswith("dist-contrast: warning: skipped 2 of 10 file(s)"), lines
    pil_limit = 2 * Image.MAX_IMAGE_PIXELS
    assert lines[1] == f"cat/bomb.png: over PIL's decompression-bomb limit of {pil_limit:,} pixels"
    assert lines[2] == "dog/big.png: 10000x10000 pixels, over --max-image-pixels 64,000,000"
    assert sorted(m["source"] for m in samples(out)["train"]) == sorted(
        f"{c}/{i:02d}.png" for c in ("cat", "dog") for i in range(4)
    )
    # a higher limit keeps the 1e8-pixel image (copied as it is, never decoded)
    again = tmp_path / "again"
    proc = run_cli("shards", "folder", str(root), "--out", str(again), "--max-image-pixels", "2e8")
    lines = warning_lines(proc)
    assert lines[0].startswith("dist-contrast: warning: skipped 1 of 10 file(s)"), lines
    kept = {m["source"] for m in samples(again)["train"]}
    assert "dog/big.png" in kept and "cat/bomb.png" not in kept


@pytest.mark.parametrize("workers", [1, 2])
def test_names_that_are_not_utf8_are_skipped_and_reported(tmp_path, workers):
    rng = np.random.default_rng(1)
    root = os.fsencode(tmp_path / "classes")
    for c in (b"cat", b"d\xf6g", b"emu"):  # d\xf6g: "dög" in Latin-1
        for i in range(2):
            write(root + b"/" + c + b"/%02d.png" % i, png_bytes(rng))
    write(root + b"/cat/caf\xe9.png", png_bytes(rng))
    write(root + b"/emu/caf\xe9.txt", b"a caption beside a Latin-1 name")
    out = tmp_path / "out"
    proc = run_cli(
        "shards", "folder", str(tmp_path / "classes"), "--out", str(out), "--workers", str(workers)
    )
    lines = warning_lines(proc)
    assert lines[0].startswith("dist-contrast: warning: skipped 3 of 7 file(s)"), lines
    assert sorted(lines[1:]) == [
        "cat/caf\\xe9.png: file or folder name is not UTF-8",
        "d\\xf6g/00.png: file or folder name is not UTF-8",
        "d\\xf6g/01.png: file or folder name is not UTF-8",
    ]
    metas = samples(out)["train"]
    # the class folders keep their places: emu is still label 2
    assert sorted((m["source"], m["label"]) for m in metas) == [
        ("cat/00.png", 0),
        ("cat/01.png", 0),
        ("emu/00.png", 2),
        ("emu/01.png", 2),
    ]


def test_a_fifo_among_the_images_is_skipped_not_waited_on(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "classes"
    for c in ("cat", "dog"):
        write(root / c / "00.png", png_bytes(rng))
    os.mkfifo(root / "dog" / "pipe.png")
    proc = run_cli("shards", "folder", str(root), "--out", str(tmp_path / "out"), timeout=120)
    lines = warning_lines(proc)
    assert lines[1:] == ["dog/pipe.png: not a regular file"], lines


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-contrast: error: "), proc.stderr
    return lines[0]


def test_a_second_write_into_a_folder_with_shards_is_refused_unless_forced(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "pics"
    for i in range(6):
        write(root / f"{i}.png", png_bytes(rng))
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    first = run_cli("shards", "folder", str(root), "--out", str(out), "--shard-size", "2")
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    assert len(before) == 5  # 3 shards, counts.json, notes.txt
    for extra in ([], ["--prefix", "other"]):
        line = one_error_line(run_cli("shards", "folder", str(root), "--out", str(out), *extra))
        assert line == (
            f"dist-contrast: error: output folder '{out}' is not empty (counts.json, notes.txt, "
            "train-000000.tar and 2 more): choose another --out, or pass --force to replace "
            "the shards of the splits written now"
        )
        assert listing(out) == before
    # --force with another prefix adds a split and keeps the first one
    proc = run_cli("shards", "folder", str(root), "--out", str(out), "--prefix", "b", "--force")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((out / "counts.json").read_text())
    assert sorted(counts) == ["b", "train"] and len(counts["train"]["shards"]) == 3
    assert all(listing(out)[n] == before[n] for n in before if n != "counts.json")
    # --force with the same prefix replaces its shards (the stale ones removed), nothing else
    proc = run_cli("shards", "folder", str(root), "--out", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["b-000000.tar", "counts.json", "notes.txt", "train-000000.tar"]
    assert (out / "notes.txt").read_text() == "mine"
    # the digits writer too
    digits = tmp_path / "digits"
    assert run_cli("shards", "digits", "--out", str(digits)).returncode == 0
    kept = listing(digits)
    line = one_error_line(run_cli("shards", "digits", "--out", str(digits)))
    assert f"output folder '{digits}' is not empty (counts.json, train-000000.tar" in line
    assert listing(digits) == kept
    proc = run_cli("shards", "digits", "--out", str(digits), "--shard-size", "2000", "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in digits.iterdir()) == [
        "counts.json",
        "train-000000.tar",
        "val-000000.tar",
    ]


def make_digits(digits: Path) -> subprocess.CompletedProcess:
    """The Makefile's rule for the digits shards, with this interpreter."""
    cmd = ["make", "-C", str(ROOT), f"DIGITS={digits}", f"PYTHON={sys.executable}"]
    return subprocess.run(
        [*cmd, f"{digits}/counts.json"], env=cli_env(), capture_output=True, text=True, timeout=300
    )


def test_the_make_rule_after_a_fresh_clone_and_an_interrupted_write(tmp_path):
    digits = tmp_path / "data" / "digits"
    proc = make_digits(digits)  # a fresh clone: no data folder at all
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((digits / "counts.json").read_text())["train"]["samples"] == 1437
    # a write killed while it stages its shards: the rule runs again and completes
    (digits / "counts.json").unlink()
    victim = subprocess.Popen(
        [sys.executable, "-m", "dist_contrast.cli", "shards", "digits", "--out", str(digits)]
        + ["--force"],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(digits.glob(".tmp-*/*.tar")) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL  # killed while staging, not ended by itself
    assert not (digits / "counts.json").exists()
    (digits / "train-000099.tar").write_bytes(b"a shard of an earlier write")
    proc = make_digits(digits)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train-000099.tar" not in os.listdir(digits)
    counts = json.loads((digits / "counts.json").read_text())
    assert sorted(p.name for p in digits.glob("*.tar")) == sorted(
        n for split in counts.values() for n in split["shards"]
    )
