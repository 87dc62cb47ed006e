"""``dist-contrast eval --run RUN``: kNN top-1 and a linear probe on the validation shards, and
for image-text runs zero-shot and retrieval, each against the same architecture at its initial
weights (the run's seed, or ``model.init_from``: ``initial_weights`` says which), so the gain
from training is visible. Written to ``eval.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from dist_contrast.data.pipeline import read_all, read_captioned
from dist_contrast.data.shards import resolve_shards
from dist_contrast.data.sources import build_sources
from dist_contrast.errors import DataError, UserError
from dist_contrast.eval.image_text import method_scores
from dist_contrast.eval.probes import scores
from dist_contrast.export.write import trained_method
from dist_contrast.methods import build_method, init
from dist_contrast.train.runs import load_run


def starting_point(cfg) -> tuple[nn.Module, str]:
    """The method at the weights training started from, and what they were: the seed's, or
    those of ``model.init_from`` (if it can still be read; else the seed's, said so). Its
    figures are the ``_random_init`` keys of ``eval.json``."""
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    if not cfg.model.init_from:
        return method, f"random (seed {cfg.run.seed})"
    try:
        init.apply(method, cfg)
    except UserError as exc:
        print(f"dist-contrast: warning: baseline at random weights: {exc}", file=sys.stderr)
        return method, f"random (seed {cfg.run.seed}; model.init_from unreadable)"
    return method, f"model.init_from {cfg.model.init_from}"


def evaluate_run(run_dir: str | Path) -> dict:
    """kNN and linear-probe top-1 of the trained and the initial encoder, written to
    ``eval.json``: ``knn_top1``, ``linear_top1`` and the same with ``_random_init``."""
    run_dir = Path(run_dir)
    cfg, step_dir = load_run(run_dir)
    train_x, train_y = read_all(
        [
            u
            for src in build_sources(
                cfg.data.train_shards, cfg.data.train_weights, "data.train_shards"
            )
            for u in src.urls
        ],
        cfg.data,
    )
    if not cfg.data.val_shards:
        raise DataError("evaluation needs validation shards: set data.val_shards")
    val_urls = resolve_shards(cfg.data.val_shards, "data.val_shards")
    image_text = cfg.method.name == "clip"
    val_x, val_y, val_captions = read_captioned(val_urls, cfg.data, require_caption=image_text)
    initial_method, initial = starting_point(cfg)
    trained_m = trained_method(cfg, step_dir)
    trained = trained_m.encoder
    result: dict = {
        "checkpoint": step_dir.name,
        "initial_weights": initial,
        "knn_k": cfg.eval.knn_k,
        "linear_weight_decay": cfg.eval.linear_weight_decay,
        "train_samples": len(train_y),
        "val_samples": len(val_y),
    }
    for suffix, enc in (("", trained), ("_random_init", initial_method.encoder)):
        probes = scores(cfg, enc, train_x, train_y, val_x, val_y)
        result.update({f"{k}{suffix}": v for k, v in probes.items()})
    if image_text:  # zero-shot and retrieval of both towers
        for suffix, m in (("", trained_m), ("_random_init", initial_method)):
            figures = method_scores(cfg, m, val_x, val_y, val_captions)
            match = figures.pop("retrieval_match", None)
            result.update({f"{k}{suffix}": v for k, v in figures.items()})
            result.setdefault("retrieval_match", match)
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, run_dir / "eval.json")
    return result
