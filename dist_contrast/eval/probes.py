"""Probes of a frozen encoder: weighted kNN top-1 (InstDisc) and a linear probe (top-1 of a
logistic regression on frozen features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.config import Config


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


def scores(cfg: Config, encoder: nn.Module, train_x, train_y, val_x, val_y) -> dict:
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
