"""Finding shards (patterns -> URLs) and writing them (the built-in digits set).

The helpers shared by every shard writer live here too: checking and staging the output
folder, cutting an index list into near-equal shards, a shard's size on disk, and moving the
finished shards in place with ``counts.json`` last."""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import braceexpand
import numpy as np
from PIL import Image

from dist_contrast.errors import DataError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Caption templates of the digits shards (the class word at the start, middle or end), one drawn
# per image (fixed by the seed). Zero-shot evaluation prompts with other templates
# (eval.zeroshot_templates), held out from these.
DIGIT_TEMPLATES = [
    "a handwritten digit {}",
    "a photo of the number {}",
    "the digit {}, written by hand",
    "a scan of a handwritten {}",
    "a small grayscale image of a {}",
    "the number {}",
    "a pixelated {}",
    "a blurry picture of the digit {}",
    "{} written with a pen",
    "a sketch of a {}",
    "a tiny picture showing {}",
    "someone wrote the number {}",
    "a faint {} on a dark background",
    "{}",
    "a crop of the digit {} from a form",
    "a noisy rendering of {}",
]


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


TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads an archive to whole records of 10,240 bytes


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a Path; an error if it exists and is not a directory (nothing is created)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    return out


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``out`` (created with its parents), removed on exit.

    Writers put shards here and move them into ``out`` only when all are complete."""
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder '{out}': {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def balanced_chunks(idx: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """``idx`` cut into the fewest chunks of at most ``shard_size``, sizes differing by <= 1.

    Never a small tail shard, so ranks get equal work."""
    return np.array_split(idx, max(1, -(-len(idx) // shard_size)))


def tar_member_bytes(size: int) -> int:
    """Bytes one tar member of ``size`` data bytes takes (header + data padded to a block)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(member_bytes: int) -> int:
    """Size on disk of an uncompressed tar whose members take ``member_bytes`` in all."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def _shard_names(out: Path, split: str) -> Iterable[Path]:
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    return (p for p in out.iterdir() if pattern.fullmatch(p.name))


def commit_shards(tmp: Path, out: Path, counts: dict, merge: bool = False) -> None:
    """Move the shards listed in ``counts`` from ``tmp`` into ``out``, then ``counts.json``.

    With ``merge``, the splits of an existing ``counts.json`` that were not written now are
    kept, and shards of a written split left over from an earlier write (``SPLIT-NNNNNN.tar``
    not in ``counts``) are removed, so a pattern ``SPLIT-*.tar`` matches the new set only."""
    for split in counts:
        for name in counts[split]["shards"]:
            os.replace(tmp / name, out / name)
    merged = dict(counts)
    if merge:
        for split in counts:
            for stale in _shard_names(out, split):
                if stale.name not in counts[split]["shards"]:
                    stale.unlink()
        old = out / "counts.json"
        try:
            previous = json.loads(old.read_text()) if old.is_file() else {}
        except (OSError, ValueError):
            previous = {}
        if isinstance(previous, dict):
            merged = {**{k: v for k, v in previous.items() if k not in counts}, **counts}
    (tmp / "counts.json").write_text(json.dumps(merged, indent=1))
    os.replace(tmp / "counts.json", out / "counts.json")


def write_digits(
    out: str | Path, shard_size: int = 200, val_fraction: float = 0.2, seed: int = 0
) -> dict:
    """Write scikit-learn's digits (1,797 8x8 images) as WebDataset shards.

    Each sample holds ``png`` (8x8 grayscale), ``cls`` (the digit) and ``txt`` (a caption from
    one of ``DIGIT_TEMPLATES``, drawn per image under ``seed``). The
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
    out = check_out_dir(out)
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(int)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=labels
    )
    template = np.random.default_rng(seed).integers(len(DIGIT_TEMPLATES), size=len(labels))
    counts: dict = {}
    with staging_dir(out) as tmp:
        for split, idx in (("train", np.sort(train_idx)), ("val", np.sort(val_idx))):
            counts[split] = {"samples": int(len(idx)), "shards": {}}
            for k, chunk in enumerate(balanced_chunks(idx, shard_size)):
                name = f"{split}-{k:06d}.tar"
                with wds.TarWriter(str(tmp / name)) as w:
                    for i in chunk:
                        w.write(
                            {
                                "__key__": f"{split}-{i:06d}",
                                "png": _png_bytes(images[i]),
                                "cls": str(labels[i]),
                                "txt": DIGIT_TEMPLATES[template[i]].format(DIGIT_NAMES[labels[i]]),
                                "json": json.dumps({"label": int(labels[i]), "index": int(i)}),
                            }
                        )
                counts[split]["shards"][name] = len(chunk)
        commit_shards(tmp, out, counts)
    return counts
