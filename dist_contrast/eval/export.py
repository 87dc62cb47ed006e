"""``dist-contrast eval --export DIR --data SHARDS [--val-data SHARDS]``: the kNN and
linear-probe top-1 of an exported image encoder on any labelled shards, and zero-shot and
retrieval of an image-text export on captioned ones.

The images are read and normalised as the run's own evaluation reads them (``read_all`` with
the export's data config), and scored by the same functions (:mod:`dist_contrast.eval.probes`,
:mod:`dist_contrast.eval.image_text`).
Without ``--val-data``, a fixed 20% of ``--data`` (a permutation seeded 0) is held out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dist_contrast.data.pipeline import read_all, read_captioned
from dist_contrast.data.shards import resolve_shards
from dist_contrast.eval.image_text import clip_scores
from dist_contrast.eval.probes import scores
from dist_contrast.export import load_encoder, read_manifest
from dist_contrast.export.layout import TEXT, ExportError

HOLDOUT = 0.2


def _holdout(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n_val = max(1, int(round(HOLDOUT * len(y))))
    if len(y) - n_val < 1:
        raise ExportError(f"--data holds {len(y)} sample(s): too few to hold out a split")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[n_val:], perm[:n_val]
    return x[tr], y[tr], x[va], y[va]


def _image_text(folder: Path, data: str, val_data: str | None) -> dict:
    """Zero-shot and retrieval of an exported image-text model on captioned shards (the
    validation shards when given, else ``data``)."""
    image = load_encoder(folder, tower="image")
    text = load_encoder(folder, tower="text")
    cfg = image.config
    spec = val_data or data
    images, labels, captions = read_captioned(resolve_shards(spec, "--data"), cfg.data)
    heads = _projections(folder)
    return clip_scores(
        nn.Sequential(image.module, heads["image_proj"]),
        nn.Sequential(text.module, heads["text_proj"]),
        text.tokenizer,
        images,
        labels,
        captions,
        cfg.eval,
    )


def _projections(folder: str | Path) -> dict:
    heads = load_encoder(folder, tower="heads").module
    missing = [k for k in ("image_proj", "text_proj") if k not in heads]
    if missing:
        raise ExportError(f"export '{folder}' has no {', '.join(missing)}: not an image-text model")
    return heads


def _probes(enc, x, y, val_data: str | None) -> dict:
    """kNN and linear-probe top-1, fitted on (x, y), measured on ``val_data`` or a hold-out."""
    cfg = enc.config
    if val_data:
        val_x, val_y = read_all(resolve_shards(val_data, "--val-data"), cfg.data)
        if bool((val_y < 0).any()):
            raise ExportError(f"the shards of '{val_data}' have unlabelled samples")
        split = "given"
    else:
        x, y, val_x, val_y = _holdout(x, y)
        split = f"{int(HOLDOUT * 100)}% of --data held out (seed 0)"
    return {
        "split": split,
        "train_samples": len(y),
        "val_samples": len(val_y),
        "knn_k": cfg.eval.knn_k,
        **scores(cfg, enc.module, x, y, val_x, val_y),
    }


def evaluate_export(folder: str | Path, data: str, val_data: str | None = None) -> dict:
    """kNN (k and temperature of the export's ``eval`` config) and linear-probe top-1 of the
    export's image tower on labelled shards: fitted on ``data``, measured on ``val_data`` (or a
    20% hold-out). With a text tower also zero-shot and retrieval (captioned shards)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    enc = load_encoder(folder, "image")  # on CPU, as evaluate_run
    x, y = read_all(resolve_shards(data, "--data"), enc.config.data)
    text = TEXT in manifest["towers"]
    labelled = bool((y >= 0).all())
    if not labelled and not text:
        raise ExportError(f"the shards of '{data}' have unlabelled samples (no cls / json label)")
    result = {
        "export": str(folder),
        "checkpoint": manifest["checkpoint"],
        "data": data,
        "val_data": val_data,
    }
    if labelled:
        result.update(_probes(enc, x, y, val_data))
    if text:
        result.update(_image_text(folder, data, val_data))
    return result
