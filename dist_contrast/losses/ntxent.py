"""NT-Xent (SimCLR, Chen et al. 2020)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses.checks import (
    check_gather,
    check_input_pair,
    check_temperature,
    check_tiling,
)
from dist_contrast.losses.kernels import tiled
from dist_contrast.losses.kernels.numerics import fp32_region, normalize
from dist_contrast.losses.reduce import gather, global_mean


class TwoViews(NamedTuple):
    """Local anchors of two views scored against the views of every rank."""

    logits: torch.Tensor  # [2n, 2N]: rows z1 then z2 of this rank, columns all z1 then all z2
    self_col: torch.Tensor  # [2n] column of each anchor itself
    pos_col: torch.Tensor  # [2n] column of each anchor's other view
    n_all: int  # N, samples on all ranks
    offset: int  # this rank's first sample in the N
    a1: torch.Tensor  # normalised local views [n, D]
    a2: torch.Tensor


class _Views(NamedTuple):
    a1: torch.Tensor  # normalised local views [n, D]
    a2: torch.Tensor
    anchors: torch.Tensor  # [2n, D]: a1 then a2
    columns: torch.Tensor  # [2N, D]: the views of every rank, all z1 then all z2
    self_col: torch.Tensor  # [2n] column of each anchor itself
    pos_col: torch.Tensor  # [2n] column of each anchor's other view
    n_all: int
    offset: int


def _views(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_mode: str) -> _Views:
    """Validate, normalise and gather: what both the full and the tiled NT-Xent score."""
    check_input_pair(z1, z2, "z1", "z2")
    check_temperature(temperature)
    use_gather = check_gather(gather_mode)
    a1, a2 = normalize(z1), normalize(z2)
    c1, offset = gather(a1, use_gather)
    c2, _ = gather(a2, use_gather)
    n_all = c1.shape[0]
    idx = torch.arange(a1.shape[0], device=a1.device) + offset
    self_col, pos_col = torch.cat([idx, idx + n_all]), torch.cat([idx + n_all, idx])
    anchors = torch.cat([a1, a2])
    return _Views(a1, a2, anchors, torch.cat([c1, c2]), self_col, pos_col, n_all, offset)


def two_views(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_mode: str) -> TwoViews:
    """Validate, normalise, gather and score. Call inside ``fp32_region()``."""
    v = _views(z1, z2, temperature, gather_mode)
    logits = v.anchors @ v.columns.T / temperature
    return TwoViews(logits, v.self_col, v.pos_col, v.n_all, v.offset, v.a1, v.a2)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    gather_mode: str = "all",
    *,
    memory_efficient: bool = False,
    tile: int | None = None,
) -> torch.Tensor:
    """NT-Xent over 2N views.

    Convention (SimCLR): ``z1[i]`` and ``z2[i]`` are two views of sample i. Each of the 2N views
    is an anchor; its positive is the other view of the same sample and its negatives are the
    other 2N - 2 views. Embeddings are L2-normalised, similarities divided by ``temperature``,
    and the loss is the mean cross-entropy over all 2N anchors.

    Distributed: with ``gather_mode="all"`` the N is global. Each rank scores only its local
    anchors against the views of every rank (gathered with gradient; memory O(N_local x N)), and
    returns ``W * (sum over its anchors) / 2N`` (the mean over its anchors when ranks hold equal
    batches), so W ranks with averaged gradients equal one process on the global batch, also
    for uneven batches. ``"off"`` keeps each rank's batch to itself.

    ``memory_efficient=True``: the same values and gradients through the tiled softmax
    (:mod:`dist_contrast.losses.kernels.tiled`), the self view left out inside each block; the
    [2n, 2N] logits exist one ``tile x tile`` block at a time (default 1024).
    """
    use_gather = check_gather(gather_mode)
    check_tiling(memory_efficient, tile)
    with fp32_region():
        if memory_efficient:  # the self view left out inside each block
            v = _views(z1, z2, temperature, gather_mode)
            per_anchor = tiled.tiled_cross_entropy(
                v.anchors,
                v.columns,
                v.pos_col,
                exclude=v.self_col,
                scale=1 / temperature,
                tile=tile,
            )
            return global_mean(per_anchor.sum(), 2 * v.n_all, use_gather)
        v = two_views(z1, z2, temperature, gather_mode)
        # in place: nothing saved for backward holds the logits (saves one [2n, 2N] copy)
        logits = v.logits.scatter_(1, v.self_col[:, None], float("-inf"))
        total = F.cross_entropy(logits, v.pos_col, reduction="sum")
        return global_mean(total, 2 * v.n_all, use_gather)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`; see there for the convention."""

    def __init__(
        self,
        temperature: float = 0.1,
        gather: str = "all",
        memory_efficient: bool = False,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_gather(gather)
        check_tiling(memory_efficient, tile)
        self.temperature = temperature
        self.gather = gather
        self.memory_efficient, self.tile = memory_efficient, tile

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(
            z1,
            z2,
            self.temperature,
            self.gather,
            memory_efficient=self.memory_efficient,
            tile=self.tile,
        )

    def negatives_per_query(self, n_local: int, world: int) -> int:
        n = n_local * (world if self.gather == "all" else 1)
        return 2 * n - 2
