"""The two inputs of the shard writers, listed as :class:`Candidate` images, and the probe.

An image folder (``ROOT/<class>/**/*.jpg`` labelled, or ``ROOT/*.jpg`` with ``x.txt`` captions)
or a CSV of ``path,caption`` rows. Steps (1) and (2) of :mod:`dist_contrast.data.write.shards`.
"""

from __future__ import annotations

import csv
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_contrast.config import DataConfig
from dist_contrast.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CSV_COLUMNS = ("path", "caption")
# Larger images are skipped (from their header): the loader's default data.max_image_pixels.
MAX_IMAGE_PIXELS = DataConfig.max_image_pixels


@dataclass(frozen=True)
class Candidate:
    """An image to probe: where to read it and what the data set says about it."""

    path: str
    source: str
    label: int | None = None
    class_name: str | None = None
    caption: str | None = None
    caption_path: str | None = None


def image_ext(name: str) -> str | None:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return ext if ext in IMAGE_EXTS else None


# ---- (1) listing the candidates ------------------------------------------------------------


def _visible(names: Sequence[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _images_under(top: Path) -> list[Path]:
    """Images anywhere below ``top``, sorted; hidden files and folders are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = _visible(dirnames)
        found += [Path(dirpath, f) for f in _visible(filenames) if image_ext(f)]
    return sorted(found)


def _candidate(path: Path, root: Path, **labels: Any) -> Candidate:
    side = path.with_suffix(".txt")
    return Candidate(
        path=str(path),
        source=path.relative_to(root).as_posix(),
        caption_path=str(side) if side.is_file() else None,
        **labels,
    )


def list_folder(root: str | Path) -> list[Candidate]:
    """``root/<class>/**/*.jpg`` (label = index of the sorted class name) or ``root/*.jpg``
    with optional ``x.txt`` captions beside ``x.jpg`` (no label)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    entries = _visible(os.listdir(root))
    top = [root / n for n in entries if image_ext(n) and (root / n).is_file()]
    classes = [n for n in entries if (root / n).is_dir()]
    if top and classes:
        raise DataError(
            f"image folder '{root}' holds both images and sub-folders: use either "
            "ROOT/<class>/*.jpg (labelled) or ROOT/*.jpg with x.txt captions"
        )
    if top:
        found = [_candidate(p, root) for p in top]
    else:
        found = [
            _candidate(p, root, label=k, class_name=name)
            for k, name in enumerate(classes)
            for p in _images_under(root / name)
        ]
    if not found:
        exts = "/".join(f".{e}" for e in IMAGE_EXTS)
        raise DataError(f"no images ({exts}) found in '{root}'")
    return found


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            return header, list(reader)
    except UnicodeDecodeError:
        raise DataError(f"CSV '{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"cannot read CSV '{path}': {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise DataError(f"CSV '{path}' line {reader.line_num}: {exc}") from None


def list_csv(csv_path: str | Path) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Rows of a CSV with a header and columns ``path,caption`` (others are ignored).

    Relative paths are taken from the CSV's folder. Rows with an empty path are skipped."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"CSV file '{path}' does not exist")
    header, rows = _read_csv(path)
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        found = ",".join(header) if header else "nothing"
        raise DataError(
            f"CSV '{path}' has no column {', '.join(repr(c) for c in missing)} "
            f"(needs a header row with {','.join(CSV_COLUMNS)}; found {found})"
        )
    if not rows:
        raise DataError(f"CSV '{path}' has a header but no rows")
    found, skipped = [], []
    for line, row in enumerate(rows, start=2):
        src = (row.get("path") or "").strip()
        if not src:
            skipped.append((f"{path.name} line {line}", "empty path"))
            continue
        full = Path(src) if os.path.isabs(src) else path.parent / src
        found.append(Candidate(path=str(full), source=src, caption=row.get("caption") or ""))
    return found, skipped


# ---- (2) probing one image ----------------------------------------------------------------


def _utf8(name: str) -> bool:
    """Whether ``name`` is text (a file name in bytes that are not UTF-8 holds surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pixels(path: str) -> tuple[int, int]:
    """(width, height) from the image header; PIL's DecompressionBombError past its own limit
    (twice ``Image.MAX_IMAGE_PIXELS``, which the loader applies too)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:  # reads the header only
            return im.size


def probe(c: Candidate, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, str | None] | str:
    """(size, caption) for a readable image of at most ``max_pixels`` pixels, else the reason
    it is skipped."""
    from PIL import Image, UnidentifiedImageError

    if image_ext(c.path) is None:
        return f"not a {'/'.join(IMAGE_EXTS)} file"
    if not _utf8(c.source):  # it could not be written in the sample's json
        return "file or folder name is not UTF-8"
    try:
        info = os.stat(c.path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            return "not a regular file"
        size = info.st_size
        width, height = _pixels(c.path)
        caption = c.caption
        if c.caption_path is not None:
            caption = Path(c.caption_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return "no such file"
    except UnidentifiedImageError:
        return "not a readable image"
    except Image.DecompressionBombError:
        return f"over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
    except UnicodeDecodeError:
        return "caption file is not UTF-8"
    except OSError as exc:
        return exc.strerror or str(exc)
    if width * height > max_pixels:
        return f"{width}x{height} pixels, over --max-image-pixels {max_pixels:,}"
    return size, (caption.strip() if caption else None)
