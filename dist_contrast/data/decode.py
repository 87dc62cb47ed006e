"""Turning a raw sample (extension -> bytes) into what a method needs, or a counted skip.

Images are checked against a pixel limit from their header, before any pixel is decoded.
Captions come from ``txt`` or, as img2dataset writes them, the ``caption`` field of ``json``.

Pixels become 8-bit L or RGB whatever the file's mode: 16- and 32-bit integer images are scaled
from the 16-bit range, floating-point ones from [0, 1], transparent pixels are composited on
white (as img2dataset does), palette, bilevel and CMYK images converted; the EXIF orientation
is applied as PIL's ``ImageOps.exif_transpose`` applies it, read from the header, so that crops
are drawn in the oriented image before its pixels are decoded.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
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


ORIENTATION = 0x0112  # the EXIF tag
# orientation -> the transpose that undoes it (the table of PIL's ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# where PIL finds an orientation: EXIF blocks and XMP packets in the header (TIFF: its tags)
_TAG_KEYS = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1-8; 1: as stored), read from what its header holds: no
    pixel is decoded (a PNG's EXIF after its pixel data is not seen). 1 if it is unreadable."""
    if not any(k in im.info for k in _TAG_KEYS) and not hasattr(im, "tag_v2"):
        return 1  # no tag: nothing to parse (and a PNG's getexif would decode the pixels)
    try:
        value = im.getexif().get(ORIENTATION, 1)  # parsed once per image, then cached by PIL
    except Exception:  # a damaged EXIF block: the image as stored
        return 1
    return value if value in _TRANSPOSE else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` once its EXIF orientation is applied."""
    w, h = im.size
    return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Decode the pixels (the expensive part; corrupt data surfaces here) in the wanted mode
    ("L" or "RGB", 8 bits), whatever the file's mode, oriented as its EXIF says."""
    mode = "L" if channels == 1 else "RGB"
    turn = _TRANSPOSE.get(orientation(im))
    try:
        im.load()
        out = _eight_bit(im, mode)
    except Exception as exc:
        raise SkipSample("corrupt_image", f"cannot decode image: {exc}") from None
    return out.transpose(turn) if turn is not None else out


def _eight_bit(im: Image.Image, mode: str) -> Image.Image:
    """Loaded pixels of any PIL mode as ``mode`` ("L" or "RGB"); the image itself if it is in
    that mode already (no copy)."""
    if im.mode == mode and "transparency" not in im.info:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        im = Image.fromarray(_scaled(np.asarray(im)), "L")
    elif im.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    if im.mode == mode:
        return im
    try:
        return im.convert(mode)
    except ValueError:  # no direct conversion (LAB -> L): through RGB
        return im.convert("RGB").convert(mode)


def _scaled(values: np.ndarray) -> np.ndarray:
    """Integer pixels from the 16-bit range (16-bit grey PNGs and TIFFs), floating-point ones
    from [0, 1] (from 0-255 where some exceed 1), as 0-255 grey levels, rounded."""
    if values.dtype.kind in "iu":
        scaled = values.astype(np.float64) * (255 / 65535)
    else:
        scaled = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if scaled.max(initial=0.0) <= 1.0:
            scaled *= 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_or_count(
    sample: dict, faults: Faults, max_pixels: int, require_caption: bool
) -> Decoded | None:
    try:
        return decode_sample(sample, max_pixels, require_caption)
    except SkipSample as skip:
        faults.add(skip.reason, f"{sample.get('__url__')}:{sample.get('__key__')}: {skip}")
        return None
