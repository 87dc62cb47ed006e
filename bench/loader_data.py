"""Synthetic JPEG shards for the loader benchmark (``dist_contrast_bench.loader``)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE_SIZE = 256
JPEG_QUALITY = 90
TAR_MTIME = 946684800


def synthetic_jpeg(rng: np.random.Generator, size: int = SOURCE_SIZE) -> bytes:
    """Smooth colour noise at three scales plus fine grain: compresses like a photo."""
    img = np.full((size, size, 3), 128.0, np.float32)
    for cells, weight in ((4, 0.7), (16, 0.4), (64, 0.2)):
        low = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        up = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
        img += weight * (np.asarray(up, np.float32) - 128.0)
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), TAR_MTIME
    tar.addfile(info, io.BytesIO(data))


def write_shards(out: Path, images: int, shard_size: int, seed: int = 0) -> list[str]:
    """``images`` samples (jpg, cls, json) in shards train-000000.tar, ... of ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    urls = []
    for first in range(0, images, shard_size):
        path = out / f"train-{first // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(first, min(first + shard_size, images)):
                key = f"{i:08d}"
                _add(tar, f"{key}.jpg", synthetic_jpeg(rng))
                _add(tar, f"{key}.cls", str(i % 100).encode())
                _add(tar, f"{key}.json", json.dumps({"index": i}).encode())
        urls.append(str(path))
    return urls


def existing_shards(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob("train-*.tar"))]
