"""NT-Xent (SimCLR, Chen et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses._common import (
    check_embeddings,
    check_gather,
    check_same_shape,
    check_temperature,
    fp32_region,
    gather,
    normalize,
)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather_mode: str = "all"
) -> torch.Tensor:
    """NT-Xent over 2N views.

    Convention (SimCLR): ``z1[i]`` and ``z2[i]`` are two views of sample i. Each of the 2N views
    is an anchor; its positive is the other view of the same sample and its negatives are the
    other 2N - 2 views. Embeddings are L2-normalised, similarities divided by ``temperature``,
    and the loss is the mean cross-entropy over all 2N anchors.

    Distributed: with ``gather_mode="all"`` the N is global. Each rank scores only its local
    anchors against the views of every rank (gathered with gradient; memory O(N_local x N)), and
    its loss is the mean over its anchors, so W ranks with averaged gradients equal one process
    on the global batch. ``"off"`` keeps each rank's batch to itself.
    """
    check_embeddings(z1, "z1")
    check_embeddings(z2, "z2")
    check_same_shape(z1, z2, "z1", "z2")
    check_temperature(temperature)
    use_gather = check_gather(gather_mode)
    with fp32_region():
        a1, a2 = normalize(z1), normalize(z2)
        c1, offset = gather(a1, use_gather)
        c2, _ = gather(a2, use_gather)
        n_local, n_all = a1.shape[0], c1.shape[0]
        anchors = torch.cat([a1, a2])
        logits = anchors @ torch.cat([c1, c2]).T / temperature
        idx = torch.arange(n_local, device=z1.device) + offset
        self_col = torch.cat([idx, idx + n_all])
        pos_col = torch.cat([idx + n_all, idx])
        mask = F.one_hot(self_col, 2 * n_all).bool()
        logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, pos_col)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`; see there for the convention."""

    def __init__(self, temperature: float = 0.1, gather: str = "all") -> None:
        super().__init__()
        check_temperature(temperature)
        check_gather(gather)
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, self.gather)

    def negatives_per_query(self, n_local: int, world: int) -> int:
        n = n_local * (world if self.gather == "all" else 1)
        return 2 * n - 2
