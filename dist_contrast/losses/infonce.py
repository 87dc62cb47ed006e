"""InfoNCE (van den Oord et al. 2018) in the MoCo form (He et al. 2020; Chen et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses.checks import (
    check_gather,
    check_input,
    check_input_pair,
    check_temperature,
    check_tiling,
)
from dist_contrast.losses.kernels import tiled
from dist_contrast.losses.kernels.numerics import fp32_region, normalize
from dist_contrast.losses.reduce import gather, global_count, global_mean, keep_graph


def _check_in_batch(in_batch: bool | None) -> None:
    if in_batch is not None and not isinstance(in_batch, bool):
        raise ValueError(f"in_batch must be True, False or None, got {in_batch!r}")


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.07,
    gather_mode: str = "all",
    *,
    in_batch: bool | None = None,
    memory_efficient: bool = False,
    tile: int | None = None,
) -> torch.Tensor:
    """InfoNCE: cross-entropy of each query against its key among negatives.

    Convention (MoCo): queries, keys and negatives are L2-normalised, logits are dot products
    divided by ``temperature``, and the loss is the mean cross-entropy over the queries with
    the query's own key (``k[i]`` for ``q[i]``) as the positive. The negatives of ``q[i]`` are

    - ``negatives`` [K, D] if given (MoCo v1/v2: the queue), the same K for every query; and
    - with ``in_batch=True``, the other keys of the batch: of every rank with
      ``gather_mode="all"`` (MoCo v3, keys gathered with gradient), of this rank with ``"off"``.

    ``in_batch`` defaults to True without ``negatives`` and False with them. MoCo v3 scales
    this loss by 2T; that factor belongs to the method. Keys are not detached here: a momentum
    encoder's keys come without gradient already.

    Distributed: in-batch, each rank scores its queries against the gathered keys (memory
    O(n_local x N)) and returns ``W * (sum) / N``, so W ranks with averaged gradients equal
    one process on the global batch. Without in-batch negatives no embedding is gathered; with
    ``gather_mode="all"`` the number of queries is summed over ranks and each rank returns
    ``W * (sum) / N`` all the same, so uneven per-rank batches weight samples, not ranks; with
    ``"off"`` each rank returns the mean over its own queries.

    ``memory_efficient=True`` gives the same values and gradients through the tiled softmax
    (:mod:`dist_contrast.losses.kernels.tiled`): the [n_local, N + K] logits exist one
    ``tile x tile`` block at a time (default tile 1024), memory O(tile^2) instead of
    O(n_local x (N + K)), at the price of recomputing the blocks in the backward.
    """
    check_input_pair(q, k, "q", "k")
    if negatives is not None:
        check_input(negatives, "negatives")
        if negatives.shape[1] != q.shape[1]:
            raise ValueError(
                f"negatives must have shape [K, {q.shape[1]}], got {tuple(negatives.shape)}"
            )
    check_temperature(temperature)
    use_gather = check_gather(gather_mode)
    _check_in_batch(in_batch)
    check_tiling(memory_efficient, tile)
    if in_batch is None:
        in_batch = negatives is None
    if not in_batch and negatives is None:
        raise ValueError("info_nce has no negatives: pass negatives=[K, D] or in_batch=True")
    with fp32_region():
        qn, kn = normalize(q), normalize(k)
        negs = None if negatives is None else normalize(negatives)
        keys, offset = gather(kn, use_gather) if in_batch else (kn, 0)
        if memory_efficient:
            total = _tiled_sum(qn, kn, keys, offset, negs, temperature, in_batch, tile)
        else:
            total = _full_sum(qn, kn, keys, offset, negs, temperature, in_batch)
        if not in_batch:
            return global_mean(total, global_count(qn, use_gather), use_gather)
        return keep_graph(global_mean(total, keys.shape[0], use_gather), keys)


def _full_sum(qn, kn, keys, offset, negs, temperature, in_batch) -> torch.Tensor:
    """Sum over the queries of the cross-entropy, from the whole [n, N (+ K)] logits."""
    n = qn.shape[0]
    if in_batch:
        logits = qn @ keys.T
        targets = torch.arange(n, device=qn.device) + offset
    else:
        logits = (qn * kn).sum(dim=1, keepdim=True)
        targets = torch.zeros(n, dtype=torch.long, device=qn.device)
    if negs is not None:
        logits = torch.cat([logits, qn @ negs.T], dim=1)
    return F.cross_entropy(logits / temperature, targets, reduction="sum")


def _tiled_sum(qn, kn, keys, offset, negs, temperature, in_batch, tile) -> torch.Tensor:
    """:func:`_full_sum` through the tiled softmax (no [n, N (+ K)] tensor)."""
    if in_batch:
        columns = keys if negs is None else torch.cat([keys, negs])
        targets = torch.arange(qn.shape[0], device=qn.device) + offset
        per_query = tiled.tiled_cross_entropy(
            qn, columns, targets, scale=1 / temperature, tile=tile
        )
        return per_query.sum()
    # the positive is each query's own key: one extra column per row, outside the tiles
    pos = (qn * kn).sum(dim=1) / temperature
    lse = torch.logaddexp(pos, tiled.tiled_logsumexp(qn, negs, tile=tile, scale=1 / temperature))
    return (lse - pos).sum()


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`; see there for the convention."""

    def __init__(
        self,
        temperature: float = 0.07,
        in_batch: bool | None = None,
        gather: str = "all",
        memory_efficient: bool = False,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        _check_in_batch(in_batch)
        check_gather(gather)
        check_tiling(memory_efficient, tile)
        self.temperature, self.in_batch, self.gather = temperature, in_batch, gather
        self.memory_efficient, self.tile = memory_efficient, tile

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        return info_nce(
            q,
            k,
            negatives,
            self.temperature,
            self.gather,
            in_batch=self.in_batch,
            memory_efficient=self.memory_efficient,
            tile=self.tile,
        )

    def negatives_per_query(self, n_local: int, world: int, n_extra: int = 0) -> int:
        in_batch = self.in_batch if self.in_batch is not None else n_extra == 0
        if not in_batch:
            return n_extra
        return n_extra + n_local * (world if self.gather == "all" else 1) - 1
