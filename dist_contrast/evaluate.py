"""Evaluation of a run's encoder: kNN top-1 and a linear probe (top-1 of a logistic regression
on frozen features) on the validation shards, against the same architecture at its initial
weights (the run's seed), so the gain from training is visible."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast import checkpoint
from dist_contrast.config import Config, load_config
from dist_contrast.data.pipeline import read_all, read_captioned
from dist_contrast.data.shards import resolve_shards
from dist_contrast.data.sources import build_sources
from dist_contrast.errors import CheckpointError
from dist_contrast.methods import build_method


@torch.no_grad()
def embed(
    encoder: nn.Module, images: torch.Tensor, batch_size: int, normalize: bool = True
) -> torch.Tensor:
    """Features of ``images`` in eval mode; L2-normalised unless ``normalize=False``."""
    encoder.eval()
    out = torch.cat(
        [encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    ).float()
    return F.normalize(out, dim=1) if normalize else out


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


def linear_probe_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """Top-1 of a multinomial logistic regression fitted on frozen training features.

    Features are standardised with the training mean and std; the weights and bias start at
    zero and full-batch L-BFGS (strong Wolfe line search, float64) minimises the mean
    cross-entropy plus ``weight_decay / 2 * ||W||^2`` (the bias is not penalised). The problem
    is convex and nothing is random, so the result is deterministic."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x = train_feats.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_labels) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = ((test_feats.double() - mean) / std) @ w + b
    return float((logits.argmax(dim=1) == test_labels).double().mean())


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


def trained_method(cfg: Config, step_dir: Path) -> nn.Module:
    """The run's method with the weights of the checkpoint in ``step_dir`` (consolidated)."""
    method = build_method(cfg)
    state = checkpoint.load_model_state(step_dir)
    try:
        method.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{step_dir} does not fit the run's model: {first}") from None
    return method


def trained_encoder(cfg: Config, step_dir: Path) -> nn.Module:
    return trained_method(cfg, step_dir).encoder


def _scores(cfg: Config, encoder: nn.Module, train_x, train_y, val_x, val_y) -> dict:
    """kNN (normalised features) and linear-probe (raw features) top-1 of one encoder."""
    bs, e = cfg.eval.batch_size, cfg.eval
    train_f, val_f = embed(encoder, train_x, bs, False), embed(encoder, val_x, bs, False)
    knn = knn_top1(
        F.normalize(train_f, dim=1),
        train_y,
        F.normalize(val_f, dim=1),
        val_y,
        e.knn_k,
        e.knn_temperature,
    )
    linear = linear_probe_top1(
        train_f, train_y, val_f, val_y, e.linear_weight_decay, e.linear_max_iter
    )
    return {"knn_top1": knn, "linear_top1": linear}


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
    val_urls = resolve_shards(cfg.data.val_shards, "data.val_shards")
    image_text = cfg.method.name == "clip"
    val_x, val_y, val_captions = read_captioned(val_urls, cfg.data, require_caption=image_text)
    torch.manual_seed(cfg.run.seed)  # the weights training started from
    initial_method = build_method(cfg)
    trained_m = trained_method(cfg, step_dir)
    initial, trained = initial_method.encoder, trained_m.encoder
    result: dict = {
        "checkpoint": step_dir.name,
        "knn_k": cfg.eval.knn_k,
        "linear_weight_decay": cfg.eval.linear_weight_decay,
        "train_samples": len(train_y),
        "val_samples": len(val_y),
    }
    for suffix, enc in (("", trained), ("_random_init", initial)):
        scores = _scores(cfg, enc, train_x, train_y, val_x, val_y)
        result.update({f"{k}{suffix}": v for k, v in scores.items()})
    if image_text:  # zero-shot and retrieval of both towers
        from dist_contrast.eval_clip import method_scores

        for suffix, m in (("", trained_m), ("_random_init", initial_method)):
            scores = method_scores(cfg, m, val_x, val_y, val_captions)
            match = scores.pop("retrieval_match", None)
            result.update({f"{k}{suffix}": v for k, v in scores.items()})
            result.setdefault("retrieval_match", match)
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, run_dir / "eval.json")
    return result
