"""Exported encoders: write them (:func:`export_run`, ``dist-contrast export``) and load them
(:func:`load_encoder`) without DeepSpeed or the training method.

>>> enc = load_encoder("runs/simclr_digits/export")            # tower="image", device="cpu"
>>> feats = enc.embed([pil_image_1, pil_image_2])               # [2, D], no grad
>>> enc.module(enc.preprocess(uint8_hwc_array))                 # the same, by hand
>>> clip = load_clip("runs/clip_digits/export")                 # image-text: joint space
>>> clip.logit_scale * clip.encode_image(images) @ clip.encode_text(captions).T

``dist-contrast export --format hf`` writes a folder ``transformers`` loads instead
(:mod:`dist_contrast.export.hf`).

Layout of an export directory: :mod:`dist_contrast.export.layout`.
"""

from dist_contrast.export.layout import ExportError
from dist_contrast.export.load import (
    LoadedCLIP,
    LoadedEncoder,
    Preprocess,
    load_clip,
    load_encoder,
    read_manifest,
)
from dist_contrast.export.write import ExportOptions, export_run

__all__ = [
    "ExportError",
    "ExportOptions",
    "LoadedCLIP",
    "LoadedEncoder",
    "Preprocess",
    "export_run",
    "load_clip",
    "load_encoder",
    "read_manifest",
]
