"""``dist-contrast eval --export DIR --data SETS [--val-data SETS]``: the figures of ``eval
--run`` for an export on any sets: kNN and linear-probe top-1 of its image encoder on labelled
samples, and zero-shot and retrieval of an image-text export.

The export's towers (:func:`~dist_contrast.export.load_encoder`,
:func:`~dist_contrast.export.load_clip`) are evaluated by the run's own evaluation path,
:func:`dist_contrast.eval.figures.evaluate`, under the export's config (``eval`` settings, data
decoding, precision): the sets are streamed, the bank kept sharded over the ranks (on disk past
``eval.bank_memory_mb``), so the same weights on the same sets give the figures of ``eval.json``,
and the bank's memory stops growing with ``--data`` at that budget. ``--data`` is the bank and
the linear probe's training data, ``--val-data`` the queries and the set of zero-shot and
retrieval. Without ``--val-data``, a fixed 20% of ``--data`` (a permutation seeded 0) is held out
as the probes' queries, and zero-shot and retrieval see all of ``--data``.
"""

from __future__ import annotations

from pathlib import Path

from dist_contrast.config import Config
from dist_contrast.data.evalsets import open_eval_set
from dist_contrast.eval.figures import Sets, Towers, eval_device, evaluate
from dist_contrast.eval.stream import towers_fn
from dist_contrast.export import load_clip, load_encoder, read_manifest
from dist_contrast.export.layout import TEXT

HOLDOUT = 0.2


def export_towers(folder: Path, manifest: dict, device) -> tuple[Config, Towers]:
    """The export's config and :class:`Towers`: its image encoder and, for an image-text
    export, both projections and the text tower over the export's tokenizer."""
    if TEXT not in manifest["towers"]:
        enc = load_encoder(folder, "image", device)
        return enc.config, Towers(towers_fn({"encoder": enc.module}))
    clip = load_clip(folder, device)
    encoder, proj = clip.image[0], clip.image[1]

    def image(x):
        f = encoder(x)
        return {"encoder": f, "image": proj(f)}

    return clip.config, Towers(image, clip.text_fn(), clip.text, clip.tokenizer)


def export_sets(data: str, val_data: str | None) -> Sets:
    """``--data`` (and ``--val-data``) as :class:`Sets`: samples without a caption kept (a
    set of labelled images is measured by zero-shot alone)."""
    train = open_eval_set(data, "--data")
    names = (f"'{data}' (--data)", f"'{val_data}' (--val-data)" if val_data else "")
    tags = ("--data", "--val-data")
    if val_data:
        val = open_eval_set(val_data, "--val-data")
        return Sets(train.units, val, names=names, tags=tags, require_caption=False)
    return Sets(train.units, train, holdout=HOLDOUT, names=names, tags=tags, require_caption=False)


def export_figures(
    cfg: Config, towers: Towers, data: str, val_data: str | None = None, desc: str = "eval"
) -> dict:
    """The figures of ``towers`` (an export's) on ``--data`` / ``--val-data``, with the split and
    probe settings they were measured with."""
    figures = evaluate(cfg, towers, export_sets(data, val_data), desc=desc)
    if "knn_top1" not in figures:  # unlabelled --data: zero-shot and retrieval only
        for key in ("train_samples", "val_samples"):
            figures.pop(key, None)
        return figures
    split = "given" if val_data else f"{int(HOLDOUT * 100)}% of --data held out (seed 0)"
    return {
        "split": split,
        "train_samples": figures.pop("train_samples"),
        "val_samples": figures.pop("val_samples"),
        "knn_k": cfg.eval.knn_k,
        "linear_weight_decay": cfg.eval.linear_weight_decay,
        **figures,
    }


def evaluate_export(
    folder: str | Path, data: str, val_data: str | None = None, desc: str = "eval"
) -> dict:
    """kNN and linear-probe top-1 (the export's ``eval`` settings) of the export's image
    encoder, fitted on ``data`` and measured on ``val_data`` (or a 20% hold-out of ``data``);
    with a text tower also zero-shot and retrieval (on ``val_data``, else all of ``data``). The
    sets: shards, a CLIP_benchmark folder or a folder of class folders
    (:mod:`dist_contrast.data.evalsets`). Under a process group every rank embeds its share."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    cfg, towers = export_towers(folder, manifest, eval_device())
    figures = export_figures(cfg, towers, data, val_data, desc)
    result = {
        "export": str(folder),
        "checkpoint": manifest["checkpoint"],
        "data": data,
        "val_data": val_data,
    }
    result.update(figures)
    return result
