"""Exported encoders: write them (:func:`export_run`, ``dist-contrast export``) and load them
(:func:`load_encoder`) without DeepSpeed or the training method.

>>> enc = load_encoder("runs/simclr_digits/export")            # tower="image", device="cpu"
>>> feats = enc.embed([pil_image_1, pil_image_2])               # [2, D], no grad
>>> enc.module(enc.preprocess(uint8_hwc_array))                 # the same, by hand

Layout of an export directory: :mod:`dist_contrast.export.layout`.
"""

from dist_contrast.export.layout import ExportError
from dist_contrast.export.load import LoadedEncoder, Preprocess, load_encoder, read_manifest
from dist_contrast.export.write import ExportOptions, export_run

__all__ = [
    "ExportError",
    "ExportOptions",
    "LoadedEncoder",
    "Preprocess",
    "export_run",
    "load_encoder",
    "read_manifest",
]
