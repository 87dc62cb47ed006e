"""Finding shards (patterns -> URLs) and writing them (the built-in digits set)."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
from pathlib import Path

import braceexpand
import numpy as np
from PIL import Image

from dist_contrast.errors import DataError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside braces."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def resolve_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """Expand brace patterns, globs and comma-separated lists into shard URLs.

    Local paths must exist; remote URLs are passed through. A pattern matching no file is an
    error that names it."""
    items = spec if isinstance(spec, list) else _split_top_level(spec)
    if not items:
        raise DataError(f"{what}: empty shard pattern")
    urls: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(item):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
            elif glob.has_magic(url):
                urls.extend(sorted(glob.glob(url)))
            elif os.path.isfile(url):
                urls.append(url)
    if not urls:
        shown = spec if isinstance(spec, str) else ",".join(spec)
        raise DataError(f"{what}: shard pattern '{shown}' matched no file")
    return urls


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_digits(
    out: str | Path, shard_size: int = 200, val_fraction: float = 0.2, seed: int = 0
) -> dict:
    """Write scikit-learn's digits (1,797 8x8 images) as WebDataset shards.

    Each sample holds ``png`` (8x8 grayscale), ``cls`` (the digit) and ``txt`` (a caption). The
    train/validation split is stratified and fixed by ``seed``. ``counts.json`` lists every
    shard with its sample count. Shards are written in a temporary folder and moved into
    ``out`` at the end, ``counts.json`` last, so an interrupted write leaves nothing half-done."""
    import webdataset as wds
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if shard_size <= 0:
        raise DataError("shard size must be > 0")
    if not 0 < val_fraction < 1:
        raise DataError("validation fraction must be in (0, 1)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(int)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=labels
    )
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: dict = {}
    for split, idx in (("train", np.sort(train_idx)), ("val", np.sort(val_idx))):
        # Shards of near-equal size (never a small tail shard), so ranks get equal work.
        chunks = np.array_split(idx, -(-len(idx) // shard_size))
        counts[split] = {"samples": int(len(idx)), "shards": {}}
        for k, chunk in enumerate(chunks):
            name = f"{split}-{k:06d}.tar"
            with wds.TarWriter(str(tmp / name)) as w:
                for i in chunk:
                    w.write(
                        {
                            "__key__": f"{split}-{i:06d}",
                            "png": _png_bytes(images[i]),
                            "cls": str(labels[i]),
                            "txt": f"a handwritten digit {DIGIT_NAMES[labels[i]]}",
                            "json": json.dumps({"label": int(labels[i]), "index": int(i)}),
                        }
                    )
            counts[split]["shards"][name] = len(chunk)
    for split in counts:
        for name in counts[split]["shards"]:
            os.replace(tmp / name, out / name)
    (tmp / "counts.json").write_text(json.dumps(counts, indent=1))
    os.replace(tmp / "counts.json", out / "counts.json")
    shutil.rmtree(tmp, ignore_errors=True)
    return counts
