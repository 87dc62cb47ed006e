"""Distributed reductions of the objectives: gathers with their rank offset, global means whose
gradients equal one process on the global batch, and ties that keep every rank's backward in
step."""

from __future__ import annotations

import torch

from dist_contrast import distributed


def gather(x: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, int]:
    """Rows of every rank (with gradient) and this rank's offset, or the local rows."""
    if not enabled:
        return x, 0
    return distributed.all_gather_with_offset(x)


def world(enabled: bool) -> int:
    """Ranks whose anchors make up the global batch: W with the gather on, 1 without."""
    return distributed.world_size() if enabled else 1


def all_reduce_sum(t: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over ranks, e.g. a count of non-zero losses."""
    t = t.detach()
    if enabled and distributed.is_dist() and distributed.world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def global_count(rows: torch.Tensor, enabled: bool) -> torch.Tensor:
    """The number of ``rows`` summed over ranks (with the gather on), as a tensor for
    :func:`global_mean`: the divisor of a per-sample mean that gathers nothing else."""
    return all_reduce_sum(torch.tensor(float(rows.shape[0]), device=rows.device), enabled)


def gather_labels(labels: torch.Tensor, enabled: bool) -> torch.Tensor:
    return distributed.all_gather_no_grad(labels) if enabled else labels


def global_mean(local_sum: torch.Tensor, n_global: int | torch.Tensor, enabled: bool):
    """This rank's share of a mean over the anchors of every rank.

    Returns ``W * local_sum / n_global``: the mean over ranks of these values is the global
    mean, and because the gather's backward sums the gradient over ranks, the gradient of each
    rank divided by W (DeepSpeed's average) is that of the global mean. With equal per-rank
    batches and ``n_global = W * n_local`` this is the mean over the local anchors."""
    if isinstance(n_global, torch.Tensor):
        n_global = n_global.clamp(min=1).to(local_sum.dtype)
    else:
        n_global = max(int(n_global), 1)
    return local_sum * world(enabled) / n_global


def keep_graph(loss: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Tie ``tensors`` (gathered ones) into ``loss`` with weight 0.

    Every rank must run the backward of every gather, or the ranks that do wait forever for
    the others in the backward all-reduce; a loss that happens not to use a gathered tensor on
    one rank (no pairs, no owned anchors) still reaches it through this zero term."""
    for t in tensors:
        if t.requires_grad:
            loss = loss + t.sum() * 0
    return loss
