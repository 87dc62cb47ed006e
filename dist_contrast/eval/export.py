"""``dist-contrast eval --export DIR --data SHARDS [--val-data SHARDS]``: the kNN and
linear-probe top-1 of an exported image encoder on any labelled shards, and zero-shot and
retrieval of an image-text export on captioned ones.

The images are streamed and normalised as the run's own evaluation reads them
(:mod:`dist_contrast.eval.stream` with the export's data config), and scored by the same
functions (:mod:`dist_contrast.eval.probes`, :mod:`dist_contrast.eval.image_text`).
Without ``--val-data``, a fixed 20% of ``--data`` (a permutation seeded 0) is held out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_contrast.data.evalsets import open_eval_set
from dist_contrast.eval.image_text import class_embeddings, feature_scores, zeroshot_classes
from dist_contrast.eval.probes import knn_top1, linear_probe_top1
from dist_contrast.eval.stream import check_nonempty, embed_set, towers_fn
from dist_contrast.export import load_clip, load_encoder, read_manifest
from dist_contrast.export.layout import TEXT, ExportError

HOLDOUT = 0.2


def _holdout(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = max(1, int(round(HOLDOUT * n)))
    if n - n_val < 1:
        raise ExportError(f"--data holds {n} sample(s): too few to hold out a split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[n_val:], perm[:n_val]


def _embedded(spec: str, what: str, image, cfg, text=None, require_caption=False):
    """The set ``spec`` through ``image`` (and ``text``), gathered: (features, the set)."""
    evalset = open_eval_set(spec, what)
    emb = embed_set(
        evalset.units,
        image,
        cfg.data,
        batch_size=cfg.eval.batch_size,
        text=text,
        require_caption=require_caption,
        desc=f"eval {what}",
    )
    check_nonempty(emb, f"'{spec}' ({what})")
    return emb.gathered(), evalset


def _image_text(folder: Path, data: str, val_data: str | None) -> dict:
    """Zero-shot and retrieval of an exported image-text model on captioned shards (the
    validation shards when given, else ``data``)."""
    clip = load_clip(folder)
    cfg = clip.config
    image = towers_fn({"image": clip.image})
    spec = val_data or data
    emb, evalset = _embedded(spec, "--data", image, cfg, clip.text_fn())
    named = zeroshot_classes(emb.labels, cfg.eval, evalset.classnames, evalset.templates)
    class_emb = None
    if named is not None:
        class_emb = class_embeddings(clip.text, clip.tokenizer, *named, cfg.eval.batch_size)
    return feature_scores(
        emb.feats["image"], emb.feats.get("text"), emb.labels, emb.captions, class_emb
    )


def _probes(enc, x, val_data: str | None) -> dict:
    """kNN and linear-probe top-1, fitted on ``x`` (embedded), measured on ``val_data`` or a
    hold-out of ``x``."""
    cfg = enc.config
    feats, y = x.feats["encoder"], x.labels
    if val_data:
        val, _ = _embedded(val_data, "--val-data", towers_fn({"encoder": enc.module}), cfg)
        if bool((val.labels < 0).any()):
            raise ExportError(f"the shards of '{val_data}' have unlabelled samples")
        val_f, val_y = val.feats["encoder"], val.labels
        split = "given"
    else:
        tr, va = _holdout(len(y))
        feats, y, val_f, val_y = feats[tr], y[tr], feats[va], y[va]
        split = f"{int(HOLDOUT * 100)}% of --data held out (seed 0)"
    e = cfg.eval
    knn = knn_top1(feats, y, val_f, val_y, e.knn_k, e.knn_temperature)
    linear = linear_probe_top1(feats, y, val_f, val_y, e.linear_weight_decay, e.linear_max_iter)
    return {
        "split": split,
        "train_samples": len(y),
        "val_samples": len(val_y),
        "knn_k": e.knn_k,
        "knn_top1": knn,
        "linear_top1": linear,
    }


def evaluate_export(folder: str | Path, data: str, val_data: str | None = None) -> dict:
    """kNN (k and temperature of the export's ``eval`` config) and linear-probe top-1 of the
    export's image tower on labelled shards: fitted on ``data``, measured on ``val_data`` (or a
    20% hold-out). With a text tower also zero-shot and retrieval (captioned shards). The sets
    are streamed (features kept, not pixels): shards, a CLIP_benchmark folder or a folder of
    class folders (:mod:`dist_contrast.data.evalsets`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    enc = load_encoder(folder, "image")  # on CPU, as evaluate_run
    x, _ = _embedded(data, "--data", towers_fn({"encoder": enc.module}), enc.config)
    text = TEXT in manifest["towers"]
    labelled = bool((x.labels >= 0).all())
    if not labelled and not text:
        raise ExportError(f"the shards of '{data}' have unlabelled samples (no cls / json label)")
    result = {
        "export": str(folder),
        "checkpoint": manifest["checkpoint"],
        "data": data,
        "val_data": val_data,
    }
    if labelled:
        result.update(_probes(enc, x, val_data))
    if text:
        result.update(_image_text(folder, data, val_data))
    return result
