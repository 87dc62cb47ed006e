"""Probes of a frozen encoder: weighted kNN top-1 (InstDisc) and a linear probe (top-1 of a
logistic regression on frozen features).

On one process both see every feature at once. Across ranks (:func:`sharded_scores`) the
training features stay where they were embedded, a shard per rank: kNN scores every query
against this rank's bank shard, keeps the local top k, and merges the ranks' candidates into the
global top k; the linear probe runs the same full-batch L-BFGS, each loss and gradient a sum
over the ranks' shards (all-reduced), so every rank takes the same steps. The queries (the
validation features) are on every rank. Same figures as one process, up to the order of float
sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast import distributed
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


SIM_BLOCK_BYTES = 32 << 20  # a query chunk's similarities to the bank: at most this much


def bounded_chunk(chunk: int, columns: int) -> int:
    """``chunk`` rows, fewer when ``chunk x columns`` float32 similarities would pass
    :data:`SIM_BLOCK_BYTES` (a 200k bank: 40 queries at a time), so the memory of a kNN or a
    recall pass does not grow with the bank."""
    return max(1, min(chunk, SIM_BLOCK_BYTES // (4 * max(1, columns))))


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
    chunk = bounded_chunk(chunk, len(train_feats))
    correct = 0
    for i in range(0, len(test_feats), chunk):
        sim = test_feats[i : i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        correct += _correct_votes(
            top_sim, train_labels[top_idx], test_labels[i : i + chunk], n_classes, temperature
        )
    return correct / len(test_feats)


def _correct_votes(
    top_sim: torch.Tensor,
    top_labels: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    temperature: float,
) -> int:
    """Queries whose weighted vote (exp(sim / T) per neighbour's class) finds their label."""
    votes = torch.zeros(len(top_sim), n_classes, dtype=top_sim.dtype)
    votes.scatter_add_(1, top_labels, (top_sim / temperature).exp())
    return int((votes.argmax(1) == labels).sum())


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


def _global_classes(*labels: torch.Tensor) -> int:
    top = torch.tensor([max(int(t.max()) if len(t) else -1 for t in labels)], dtype=torch.int64)
    if distributed.multi_rank():
        import torch.distributed as dist

        top = top.to(distributed.device())
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top) + 1


def knn_top1_sharded(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """:func:`knn_top1` with the bank (normalised training features) sharded over the ranks
    and the queries on every rank: local top k per query chunk, merged across ranks."""
    if not distributed.multi_rank():
        return knn_top1(bank, bank_labels, queries, query_labels, k, temperature, chunk)
    n_classes = _global_classes(bank_labels, query_labels)
    n_bank = int(distributed.all_reduce_sum([float(len(bank))])[0])
    k = min(k, n_bank)
    dev = distributed.device()
    chunk = bounded_chunk(chunk, n_bank)  # the same on every rank
    correct = 0
    for i in range(0, len(queries), chunk):
        q = queries[i : i + chunk]
        sim = q @ bank.T if len(bank) else q.new_zeros(len(q), 0)
        kl = min(k, sim.shape[1])
        top_sim, top_idx = sim.topk(kl, dim=1)
        pad = k - kl  # a short shard: candidates that never win
        top_sim = torch.cat([top_sim, top_sim.new_full((len(q), pad), float("-inf"))], dim=1)
        top_lab = torch.cat([bank_labels[top_idx], top_idx.new_zeros(len(q), pad)], dim=1)
        sims = _gather_columns(top_sim.to(dev)).cpu()
        labs = _gather_columns(top_lab.to(dev)).cpu()
        best_sim, best = sims.topk(k, dim=1)
        correct += _correct_votes(
            best_sim, labs.gather(1, best), query_labels[i : i + chunk], n_classes, temperature
        )
    return correct / len(queries)


def _gather_columns(x: torch.Tensor) -> torch.Tensor:
    """[n, k] from every rank -> [n, W * k] (ranks side by side)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(distributed.world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = t.detach().to(distributed.device()).clone()
    dist.all_reduce(out)
    return out.to(t.device)


def linear_probe_top1_sharded(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """:func:`linear_probe_top1` with the training features sharded over the ranks: the
    standardisation, the loss and its gradient are sums over all shards (all-reduced), so
    every rank runs the same L-BFGS steps as one process on all the features."""
    if not distributed.multi_rank():
        return linear_probe_top1(
            train_feats, train_labels, test_feats, test_labels, weight_decay, max_iter
        )
    n_classes = _global_classes(train_labels, test_labels)
    x = train_feats.double()
    n = float(_all_sum(torch.tensor([float(len(x))], dtype=torch.float64)))
    mean = _all_sum(x.sum(dim=0)) / n
    var = _all_sum(((x - mean) ** 2).sum(dim=0)) / (n - 1)
    std = var.sqrt().clamp(min=1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    main = distributed.rank() == 0

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, train_labels, reduction="sum") / n
        if main:  # the penalty once, not once per rank
            loss = loss + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        w.grad.copy_(_all_sum(w.grad))
        b.grad.copy_(_all_sum(b.grad))
        return _all_sum(loss)

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = ((test_feats.double() - mean) / std) @ w + b
    return float((logits.argmax(dim=1) == test_labels).double().mean())


def sharded_scores(cfg: Config, train, val) -> dict:
    """kNN and linear-probe top-1 from embedded sets: ``train`` this rank's shard of the
    training features (``feats["encoder"]``), ``val`` the gathered validation features."""
    e = cfg.eval
    train_f, val_f = train.feats["encoder"].float(), val.feats["encoder"].float()
    knn = knn_top1_sharded(
        F.normalize(train_f, dim=1),
        train.labels,
        F.normalize(val_f, dim=1),
        val.labels,
        e.knn_k,
        e.knn_temperature,
    )
    linear = linear_probe_top1_sharded(
        train_f, train.labels, val_f, val.labels, e.linear_weight_decay, e.linear_max_iter
    )
    return {"knn_top1": knn, "linear_top1": linear}
