"""Probes of a frozen encoder: weighted kNN top-1 (InstDisc) and a linear probe (top-1 of a
logistic regression on frozen features).

On one process both see every feature at once. Across ranks (:func:`sharded_scores`) the
training features stay where they were embedded, a shard per rank: kNN scores every query
against this rank's bank shard, keeps the local top k, and merges the ranks' candidates into the
global top k; the linear probe runs the same full-batch L-BFGS, each loss and gradient a sum
over the ranks' shards (all-reduced), so every rank takes the same steps. The queries (the
validation features) are on every rank. Same figures as one process: a sample's features
are the same bits whichever rank embeds it (:mod:`dist_contrast.eval.stream`), and the k
nearest are chosen by (similarity, label), not by the candidates' order (:func:`_keys`); the
linear probe's all-reduced sums may differ in the last bits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast import distributed
from dist_contrast.config import Config
from dist_contrast.eval.memory import release_freed_memory


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


SIM_BLOCK_BYTES = 8 << 20  # a query chunk's similarities to the bank: at most this much


def bounded_chunk(chunk: int, columns: int) -> int:
    """``chunk`` rows, fewer when ``chunk x columns`` float32 similarities would pass
    :data:`SIM_BLOCK_BYTES` (a 200k bank: 10 queries at a time), so the memory of a kNN or a
    recall pass does not grow with the bank."""
    return max(1, min(chunk, SIM_BLOCK_BYTES // (4 * max(1, columns))))


BANK_BLOCK_BYTES = 8 << 20  # normalised fp32 bank rows scored at a time
PROBE_BLOCK_BYTES = 32 << 20  # standardised fp64 training rows of the linear probe at a time


def unit_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.normalize(x.float(), dim=1)``, the same numbers, with one fp32 copy (normalised in
    place) rather than two; written into ``out`` (fp32, ``x``'s shape) where given."""
    if out is not None:
        y = out.copy_(x)
    else:
        y = x.float() if x.dtype != torch.float32 else x.clone()
    return y.div_(y.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _blocks(n: int, dim: int, budget: int, itemsize: int) -> list[tuple[int, int]]:
    rows = max(1, budget // (itemsize * max(1, dim)))
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


LABEL_BITS = 24  # labels below 2^24 (16.7M classes) share an int64 key with the similarity


def _keys(sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (similarity, then the smaller label): the top k of a query is the
    same set, in the same order, whatever the order of its candidates (the bank's rows split
    over ranks or blocks). Similarities that round to the same float32 (nearly parallel
    features: a collapsed tower gives hundreds) are otherwise cut at the k-th place by
    position, and the vote depends on the world size. The float's bits map to an int32 of the
    same order (negative floats: the low 31 bits flipped)."""
    bits = sim.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << LABEL_BITS) | ((1 << LABEL_BITS) - 1 - labels.to(torch.int64))


def _unkey(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (float32 similarities, int64 labels) of :func:`_keys`, bit for bit."""
    ordered = (keys >> LABEL_BITS).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), (1 << LABEL_BITS) - 1 - (keys & ((1 << LABEL_BITS) - 1))


def _top_k_keys(
    sim: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` best (similarity, label) pairs, by :func:`_keys`: sorted, canonical.
    The keys of a similarity chunk are int64: twice the chunk's bytes while it is scored."""
    return _unkey(_keys(sim, labels).topk(k, dim=1).values)


def _local_top_k(
    bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``k`` most similar bank rows (cosine): (similarities, their labels), both
    [Q, k], -inf / label 0 where the bank has fewer than ``k`` rows. The bank (features of any
    dtype) is normalised a block at a time, each block scored against the queries a chunk at
    a time and merged into the running top k: memory is one block and one similarity chunk,
    whatever the bank's size."""
    q_all = unit_rows(queries)
    top_sim = q_all.new_full((len(q_all), k), float("-inf"))
    top_lab = labels.new_zeros(len(q_all), k)
    dim = bank.shape[1]
    blocks = _blocks(len(bank), dim, BANK_BLOCK_BYTES, 4)
    # one buffer for a block's normalised rows and one for a chunk's similarities, reused:
    # a fresh 8 MB tensor per chunk left glibc's arenas holding tens of MB more
    widest = max((b1 - b0 for b0, b1 in blocks), default=0)
    rows_buf = torch.empty(widest * dim)
    sim_buf = torch.empty(bounded_chunk(chunk, widest) * widest)
    for b0, b1 in blocks:
        rows = unit_rows(bank[b0:b1], out=rows_buf[: (b1 - b0) * dim].view(b1 - b0, dim))
        step = bounded_chunk(chunk, b1 - b0)
        for i in range(0, len(q_all), step):
            q = q_all[i : i + step]
            block_sim = torch.mm(q, rows.T, out=sim_buf[: len(q) * len(rows)].view(len(q), -1))
            block_lab = labels[b0:b1].expand(len(q), -1)
            sim, lab = _top_k_keys(block_sim, block_lab, min(k, b1 - b0))
            if len(blocks) > 1:  # merged with the earlier blocks' candidates
                sim = torch.cat([top_sim[i : i + step], sim], dim=1)
                lab = torch.cat([top_lab[i : i + step], lab], dim=1)
                sim, lab = _top_k_keys(sim, lab, k)
            top_sim[i : i + step, : sim.shape[1]] = sim
            top_lab[i : i + step, : lab.shape[1]] = lab
        del rows
        release_freed_memory()  # the block's temporaries, not kept by the C library
    return top_sim, top_lab


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
    votes for its class with weight exp(sim / temperature). Features as embedded (any
    dtype, not normalised): rows are normalised where they are scored."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    top_sim, top_lab = _local_top_k(train_feats, train_labels, test_feats, k, chunk)
    correct = 0
    for i in range(0, len(test_feats), chunk):
        j = i + chunk
        correct += _correct_votes(
            top_sim[i:j], top_lab[i:j], test_labels[i:j], n_classes, temperature
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


def _standardizer(x: torch.Tensor, n: float, all_sum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (n - 1) of the rows of ``x`` in float64, a block of rows at a time (over
    every rank's rows with ``all_sum``); ``n`` the number of rows in all."""
    blocks = _blocks(len(x), x.shape[1], PROBE_BLOCK_BYTES, 8)
    zero = torch.zeros(x.shape[1], dtype=torch.float64)
    total = sum((x[i:j].double().sum(dim=0) for i, j in blocks), zero)
    mean = (all_sum(total) if all_sum else total) / n
    sq = sum((((x[i:j].double() - mean) ** 2).sum(dim=0) for i, j in blocks), zero)
    var = (all_sum(sq) if all_sum else sq) / (n - 1)
    return mean, var.sqrt().clamp(min=1e-6)


def _fit_linear(
    x: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    weight_decay: float,
    max_iter: int,
    all_sum=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The L-BFGS fit of :func:`linear_probe_top1` on the raw features ``x`` (any dtype, a
    tensor or :class:`~dist_contrast.eval.memory.DiskRows`: only read by slices of rows):
    (w, b, mean, std). Rows are standardised in float64 a block at a time inside each loss
    evaluation, so the probe holds one block more than the features, not three float64
    copies of them. With ``all_sum`` (across ranks) the loss and the gradient are sums over
    every rank's rows and every rank takes the same steps."""
    if all_sum is None:
        n = float(len(x))
        blocks = _blocks(len(x), x.shape[1], PROBE_BLOCK_BYTES, 8)
        if len(blocks) == 1:  # one block: as it always was, the same numbers
            xd = x[0 : len(x)].double()
            mean, std = xd.mean(dim=0), xd.std(dim=0).clamp(min=1e-6)
        else:
            mean, std = _standardizer(x, n)
    else:
        n = float(all_sum(torch.tensor([float(len(x))], dtype=torch.float64)))
        mean, std = _standardizer(x, n, all_sum)
    blocks = _blocks(len(x), x.shape[1], PROBE_BLOCK_BYTES, 8)
    whole = (x[0 : len(x)].double() - mean) / std if len(blocks) == 1 else None
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    penalty = all_sum is None or distributed.rank() == 0  # once, not once per rank

    def closure() -> torch.Tensor:
        opt.zero_grad()
        if whole is not None and all_sum is None:  # one process, one block
            loss = F.cross_entropy(whole @ w + b, labels) + 0.5 * weight_decay * (w * w).sum()
            loss.backward()
            return loss
        total = torch.zeros((), dtype=torch.float64)
        for i, j in blocks:
            xb = whole[i:j] if whole is not None else (x[i:j].double() - mean) / std
            part = F.cross_entropy(xb @ w + b, labels[i:j], reduction="sum") / n
            if penalty and i == 0:
                part = part + 0.5 * weight_decay * (w * w).sum()
            part.backward()
            total += part.detach()
        if not blocks and penalty:  # a rank without training rows
            pen = 0.5 * weight_decay * (w * w).sum()
            pen.backward()
            total += pen.detach()
        if all_sum is not None:
            if w.grad is None:
                w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
            w.grad.copy_(all_sum(w.grad))
            b.grad.copy_(all_sum(b.grad))
            total = all_sum(total)
        return total

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


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
    w, b, mean, std = _fit_linear(train_feats, train_labels, n_classes, weight_decay, max_iter)
    return _probe_accuracy(test_feats, test_labels, w, b, mean, std)


def _probe_accuracy(feats, labels, w, b, mean, std) -> float:
    correct = 0
    for i, j in _blocks(len(feats), feats.shape[1], PROBE_BLOCK_BYTES, 8):
        logits = ((feats[i:j].double() - mean) / std) @ w + b
        correct += int((logits.argmax(dim=1) == labels[i:j]).sum())
    return correct / len(feats)


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
    """:func:`knn_top1` with the bank (training features) sharded over the ranks and the
    queries on every rank: each rank's top k per query, merged across ranks a query chunk at
    a time."""
    if not distributed.multi_rank():
        return knn_top1(bank, bank_labels, queries, query_labels, k, temperature, chunk)
    n_classes = _global_classes(bank_labels, query_labels)
    n_bank = int(distributed.all_reduce_sum([float(len(bank))])[0])
    k = min(k, n_bank)
    dev = distributed.device()
    if len(bank):
        local_sim, local_lab = _local_top_k(bank, bank_labels, queries, k, chunk)
    else:  # an empty shard: candidates that never win
        local_sim = queries.new_full((len(queries), k), float("-inf"), dtype=torch.float32)
        local_lab = bank_labels.new_zeros(len(queries), k)
    correct = 0
    for i in range(0, len(queries), chunk):  # the same chunks on every rank
        j = i + chunk
        sims = _gather_columns(local_sim[i:j].to(dev)).cpu()
        labs = _gather_columns(local_lab[i:j].to(dev)).cpu()
        best_sim, best_lab = _top_k_keys(sims, labs, k)
        correct += _correct_votes(best_sim, best_lab, query_labels[i:j], n_classes, temperature)
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
    fit = _fit_linear(train_feats, train_labels, n_classes, weight_decay, max_iter, _all_sum)
    return _probe_accuracy(test_feats, test_labels, *fit)


def sharded_scores(cfg: Config, train, val) -> dict:
    """kNN and linear-probe top-1 from embedded sets: ``train`` this rank's shard of the
    training features (``feats["encoder"]``), ``val`` the gathered validation features."""
    e = cfg.eval
    train_f, val_f = train.feats["encoder"], val.feats["encoder"]
    knn = knn_top1_sharded(
        train_f,
        train.labels,
        val_f,
        val.labels,
        e.knn_k,
        e.knn_temperature,
    )
    linear = linear_probe_top1_sharded(
        train_f, train.labels, val_f, val.labels, e.linear_weight_decay, e.linear_max_iter
    )
    return {"knn_top1": knn, "linear_top1": linear}
