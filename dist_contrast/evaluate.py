"""Evaluation of a run's encoder: kNN top-1 on the validation shards, against the same
architecture at its initial weights (the run's seed), so the gain from training is visible."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast import checkpoint
from dist_contrast.config import Config, load_config
from dist_contrast.data.pipeline import read_all
from dist_contrast.data.shards import resolve_shards
from dist_contrast.data.sources import build_sources
from dist_contrast.errors import CheckpointError
from dist_contrast.methods import build_method


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    encoder.eval()
    out = [encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=1)


def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted kNN on cosine similarity (InstDisc): each of the k nearest training samples
    votes for its class with weight exp(sim / temperature)."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    correct = 0
    for i in range(0, len(test_feats), chunk):
        sim = test_feats[i : i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[i : i + chunk]).sum())
    return correct / len(test_feats)


def load_run(run_dir: Path) -> tuple[Config, Path]:
    """The resolved config of a run and its latest checkpoint directory."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist or is not a directory")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' has no config.yaml: is it a run directory?")
    cfg = load_config(run_dir / "config.yaml")
    step_dir = checkpoint.read_latest(run_dir / "checkpoints")
    if step_dir is None:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint yet")
    return cfg, step_dir


def trained_encoder(cfg: Config, step_dir: Path) -> nn.Module:
    method = build_method(cfg)
    state = checkpoint.load_model_state(step_dir)
    try:
        method.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{step_dir} does not fit the run's model: {first}") from None
    return method.encoder


def evaluate_run(run_dir: str | Path) -> dict:
    """kNN top-1 of the trained and the initial encoder; written to ``eval.json``."""
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
    val_x, val_y = read_all(resolve_shards(cfg.data.val_shards, "data.val_shards"), cfg.data)
    torch.manual_seed(cfg.run.seed)  # the weights training started from
    initial = build_method(cfg).encoder
    trained = trained_encoder(cfg, step_dir)
    result: dict = {
        "checkpoint": step_dir.name,
        "knn_k": cfg.eval.knn_k,
        "train_samples": len(train_y),
        "val_samples": len(val_y),
    }
    for name, enc in (("knn_top1", trained), ("knn_top1_random_init", initial)):
        bs = cfg.eval.batch_size
        result[name] = knn_top1(
            embed(enc, train_x, bs),
            train_y,
            embed(enc, val_x, bs),
            val_y,
            cfg.eval.knn_k,
            cfg.eval.knn_temperature,
        )
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, run_dir / "eval.json")
    return result
