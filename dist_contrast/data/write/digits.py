"""The built-in digits set (scikit-learn's 1,797 8x8 images) as captioned, labelled shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dist_contrast.config import DIGIT_NAMES
from dist_contrast.data.write.files import (
    balanced_chunks,
    check_out_dir,
    commit_shards,
    staging_dir,
)
from dist_contrast.errors import DataError

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


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_digits(
    out: str | Path,
    shard_size: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Write scikit-learn's digits (1,797 8x8 images) as WebDataset shards.

    Each sample holds ``png`` (8x8 grayscale), ``cls`` (the digit) and ``txt`` (a caption from
    one of ``DIGIT_TEMPLATES``, drawn per image under ``seed``). The
    train/validation split is stratified and fixed by ``seed``. ``counts.json`` lists every
    shard with its sample count. Shards are written in a temporary folder and moved into
    ``out`` at the end, ``counts.json`` last, so an interrupted write leaves nothing half-done.
    An ``out`` that is not empty is refused unless ``force``: then the train and val shards
    there are replaced (those of an earlier write that the new one lacks removed)."""
    import webdataset as wds
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if shard_size <= 0:
        raise DataError("shard size must be > 0")
    if not 0 < val_fraction < 1:
        raise DataError("validation fraction must be in (0, 1)")
    out = check_out_dir(out, force)
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
        commit_shards(tmp, out, counts, merge=True)
    return counts
