"""Log-sum-exp over negatives that are sharded across ranks, with an exact backward.

Every rank holds a shard of the negatives (a MoCo queue shard, rows sampled from its part of a
memory bank) and its own queries ``x`` [n, D] (with gradient). To score every query against the
negatives of *all* ranks without moving the shards:

1. the queries are gathered (``all_gather_with_offset``, backward: sum-reduce over ranks and keep
   this rank's rows), giving ``x_all`` [N, D] on every rank;
2. each rank computes the log-sum-exp of ``x_all`` against its own shard, ``lse_r`` [N]
   (:func:`local_logsumexp`; no gradient into the shard);
3. the per-rank values are combined (:func:`combine_logsumexp`):
   ``lse = log sum_r exp(lse_r)``, the log-sum-exp over all K_total negatives, the same on
   every rank. Backward: the incoming gradient is sum-reduced over ranks (every rank's loss
   may depend on every query's ``lse``) and scaled by ``exp(lse_r - lse)``, the share of this
   shard, so autograd continues into step 2 with ``softmax_r(x_all, shard) @ shard / T``.

The gradient each rank receives for its own queries is then the sum over ranks of every
rank's loss' gradient, which is what the gather convention of ``dist_contrast.distributed``
expects (each rank's loss a mean over its own queries, DeepSpeed averaging gradients).

Cost per rank and step: one all_gather of N x D queries (plus an all_reduce of N x D in the
backward), one all_gather of N floats (forward) and one all_reduce of N floats (backward);
compute N x K_shard x D, the same as scoring n local queries against K_total negatives.
Memory: the N x K_shard logits, or one ``tile x tile`` block of them at a time with ``tile``
set (the tiled softmax of :mod:`dist_contrast.losses.kernels.tiled`; the backward recomputes each
block). Results are in the dtype of ``x`` (callers upcast to at least fp32 inside
``fp32_region()``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_contrast import distributed
from dist_contrast.distributed import multi_rank
from dist_contrast.losses.kernels.numerics import fp32_region
from dist_contrast.losses.kernels.tiled import tiled_logsumexp

# --------------------------------------------------------------------------------------------
# Step 2: log-sum-exp against this rank's shard


class _LogSumExp(torch.autograd.Function):
    """``logsumexp(x @ keys.T * scale, dim=1)`` through the fused log-softmax kernel (about
    twice as fast as ``torch.logsumexp`` and its backward on CPU). Saves the N x K
    log-softmax; ``lse = top - log_softmax[argmax]`` (no cancellation: that entry is within
    log K of 0). Backward: ``(g * softmax) @ keys * scale``. Gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keys: torch.Tensor, scale: float):
        logits = (x * scale) @ keys.T
        top, where = logits.max(dim=1, keepdim=True)
        log_p = torch.log_softmax(logits, dim=1)
        del logits
        ctx.save_for_backward(log_p, keys)
        ctx.scale = scale
        return (top - log_p.gather(1, where)).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_p, keys = ctx.saved_tensors
        with fp32_region():  # a backward() called inside autocast would run this matmul in bf16
            p = log_p.exp().mul_(grad[:, None])
            return (p @ keys) * ctx.scale, None, None


class _TiledLogSumExp:
    """``apply(x, keys, scale, tile)``: ``logsumexp(x @ keys.T * scale, dim=1)`` through
    :func:`dist_contrast.losses.kernels.tiled.tiled_logsumexp` (running log-sum-exp forward, block
    recompute backward, memory O(tile x tile)), with the keys as constants and the result in
    the dtype of ``x``. Gradient for ``x`` only."""

    @staticmethod
    def apply(x: torch.Tensor, keys: torch.Tensor, scale: float, tile: int) -> torch.Tensor:
        return tiled_logsumexp(x, keys.detach(), tile=tile, scale=scale).to(x.dtype)


def local_logsumexp(
    x: torch.Tensor, keys: torch.Tensor, temperature: float, tile: int | None = None
) -> torch.Tensor:
    """``logsumexp(x @ keys.T / temperature, dim=1)`` [N], with gradient for ``x`` only.

    ``tile=None`` materialises the N x K logits (their log-softmax is kept for the backward);
    ``tile=t`` never holds more than a t x t block of them and recomputes them in the backward
    (:func:`dist_contrast.losses.kernels.tiled.tiled_logsumexp`)."""
    keys = keys.detach().to(x.dtype)
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of keys or None, got {tile}")
    if keys.shape[0] == 0:
        return x.new_full((x.shape[0],), float("-inf"))
    if tile is None or tile >= keys.shape[0]:
        return _LogSumExp.apply(x, keys, 1.0 / temperature)
    return _TiledLogSumExp.apply(x, keys, 1.0 / temperature, int(tile))


# --------------------------------------------------------------------------------------------
# Step 3: combine over ranks


class _CombineLogSumExp(torch.autograd.Function):
    """Forward: ``log sum_r exp(lse_r)`` from an all_gather of every rank's [N] values (summed
    in rank order, so every rank gets bit-identical results). Backward: all_reduce the
    incoming gradient, times ``exp(lse_r - lse)``."""

    @staticmethod
    def forward(ctx, lse_local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(lse_local) for _ in range(distributed.world_size())]
        dist.all_gather(parts, lse_local.contiguous())
        lse = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(lse_local, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        lse_local, lse = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad * torch.exp(lse_local - lse)


class _CombineSum(torch.autograd.Function):
    """Forward: all_reduce SUM of every rank's [N] partial sums. Backward: all_reduce SUM of the
    incoming gradient (every rank's loss may depend on every entry)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor) -> torch.Tensor:
        total = partial.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def combine_logsumexp(lse_local: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp over ranks of per-rank log-sum-exps [N] (identity on one process)."""
    if not multi_rank():
        return lse_local
    return _CombineLogSumExp.apply(lse_local)


def combine_sum(partial: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of per-rank partial sums [N] (identity on one process)."""
    if not multi_rank():
        return partial
    return _CombineSum.apply(partial)


# --------------------------------------------------------------------------------------------
# Steps 1-3 together


def distributed_logsumexp(
    x: torch.Tensor, shard: torch.Tensor, temperature: float, tile: int | None = None
) -> tuple[torch.Tensor, int]:
    """Log-sum-exp of this rank's queries against the negatives of every rank.

    ``x`` [n, D]: this rank's queries (any normalisation is the caller's); ``shard`` [K_r, D]:
    this rank's negatives (no gradient flows into them). Returns ``(lse, n_all)``: ``lse`` [n]
    with ``lse[i] = log sum_{r, j} exp(x[i] . shard_r[j] / temperature)`` over the shards of all
    ranks, and ``n_all`` the number of queries over all ranks (for ``global_mean``).

    A collective: every rank must call it, and every rank's loss must use the result, or none
    (the backward runs collectives too). Ranks may hold different numbers of queries and of
    negatives."""
    x_all, offset = distributed.all_gather_with_offset(x)
    lse = combine_logsumexp(local_logsumexp(x_all, shard, temperature, tile))
    return lse[offset : offset + x.shape[0]], x_all.shape[0]
