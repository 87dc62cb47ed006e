"""Turning a raw sample (extension -> bytes) into what a method needs, or a counted skip.

Images are checked against a pixel limit from their header, before any pixel is decoded.
Captions come from ``txt`` or, as img2dataset writes them, the ``caption`` field of ``json``.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

from dist_contrast.data.tario import Faults

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of tario.FAULT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Decoded:
    image: Image.Image  # opened, header read; pixels decoded on first use
    label: int
    index: int
    caption: str | None


def _json(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


def caption_of(sample: dict, meta: dict) -> str | None:
    if "txt" in sample:
        return _text(sample["txt"]).strip()
    value = meta.get("caption")
    return str(value).strip() if value is not None else None


def label_of(sample: dict, meta: dict) -> int:
    for raw in (sample.get("cls"), meta.get("label")):
        if raw is not None:
            try:
                return int(_text(raw).strip()) if not isinstance(raw, int) else raw
            except ValueError:
                continue
    return -1


def sample_fields(sample: dict) -> dict[str, bool]:
    """Which of a label, a data set index and a caption a raw sample carries (the names of
    :data:`dist_contrast.methods.registry.FIELDS`)."""
    meta = _json(sample)
    index = meta.get("index", -1)
    return {
        "label": label_of(sample, meta) >= 0,
        "index": isinstance(index, int) and index >= 0,
        "caption": bool(caption_of(sample, meta)),
    }


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image and check its size from the header; pixels are not decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for bad data
        raise SkipSample("corrupt_image", f"cannot identify image: {exc}") from None
    w, h = im.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise SkipSample("oversized_image", f"{w}x{h} pixels exceeds {max_pixels}")
    return im


def decode_sample(sample: dict, max_pixels: int, require_caption: bool) -> Decoded:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise SkipSample("missing_image", f"no {'/'.join(IMAGE_KEYS)} entry")
    meta = _json(sample)
    caption = caption_of(sample, meta)
    if require_caption and caption is None:
        raise SkipSample("missing_caption", "no txt entry and no json caption")
    if require_caption and not caption:
        raise SkipSample("empty_caption", "empty caption")
    image = open_image(sample[key], max_pixels)
    index = meta.get("index", -1)
    return Decoded(
        image, label_of(sample, meta), int(index) if isinstance(index, int) else -1, caption
    )


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Decode the pixels (the expensive part; corrupt data surfaces here) in the wanted mode."""
    mode = "L" if channels == 1 else "RGB"
    try:
        im.load()
        return im if im.mode == mode else im.convert(mode)  # convert copies even in-mode
    except Exception as exc:
        raise SkipSample("corrupt_image", f"cannot decode image: {exc}") from None


def decode_or_count(
    sample: dict, faults: Faults, max_pixels: int, require_caption: bool
) -> Decoded | None:
    try:
        return decode_sample(sample, max_pixels, require_caption)
    except SkipSample as skip:
        faults.add(skip.reason, f"{sample.get('__url__')}:{sample.get('__key__')}: {skip}")
        return None
