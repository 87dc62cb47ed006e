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

from dist_contrast import distributed
from dist_contrast.errors import UserError
from dist_contrast.eval.figures import method_figures, run_sets
from dist_contrast.export.write import trained_method
from dist_contrast.methods import build_method, init
from dist_contrast.train import integrity
from dist_contrast.train.runs import run_config


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


def evaluate_run(
    run_dir: str | Path, progress: bool = True, overrides=(), step: int | None = None
) -> dict:
    """kNN and linear-probe top-1 of the trained and the initial encoder (and zero-shot and
    retrieval for image-text runs) of its latest checkpoint (or of ``step``), verified against
    its manifest and pinned while read, written to ``eval.json`` by rank 0: ``knn_top1``,
    ``linear_top1``, ... and the same with ``_random_init``. Under torchrun every rank embeds
    its share of the sets (:mod:`dist_contrast.eval.figures`); the figures are the same.
    ``overrides``: ``eval.key=value`` settings of this evaluation (batch size, feature
    storage, ...), over the run's."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    sets = run_sets(cfg)
    initial_method, initial = starting_point(cfg)
    with integrity.reading(run_dir / "checkpoints", step) as step_dir:
        trained_m = trained_method(cfg, step_dir)
    desc = "eval" if progress else ""
    trained = method_figures(cfg, trained_m, sets, desc=desc)
    baseline = method_figures(cfg, initial_method, sets, desc=desc and "eval (initial)")
    result: dict = {
        "checkpoint": step_dir.name,
        "initial_weights": initial,
        "knn_k": cfg.eval.knn_k,
        "linear_weight_decay": cfg.eval.linear_weight_decay,
        "train_samples": trained.pop("train_samples"),
        "val_samples": trained.pop("val_samples"),
    }
    match = trained.pop("retrieval_match", None)
    if "zeroshot_samples" in trained:
        result["zeroshot_samples"] = trained.pop("zeroshot_samples")
    result.update(trained)
    result.update({f"{k}_random_init": v for k, v in baseline.items() if k not in NOT_FIGURES})
    if match is not None:
        result["retrieval_match"] = match
    if distributed.is_main():
        tmp = run_dir / "eval.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, run_dir / "eval.json")
    return result


NOT_FIGURES = {"train_samples", "val_samples", "zeroshot_samples", "retrieval_match"}
