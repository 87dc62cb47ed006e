"""BYOL's regression of the online prediction to the momentum target (Grill et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.losses.checks import check_gather, check_input_pair
from dist_contrast.losses.kernels.numerics import fp32_region, normalize


def _regression(p: torch.Tensor, z: torch.Tensor, np_: str, nz: str) -> torch.Tensor:
    check_input_pair(p, z, np_, nz)
    return (2 - 2 * (normalize(p) * normalize(z.detach())).sum(dim=1)).mean()


def byol_loss(
    p1: torch.Tensor,
    z2: torch.Tensor,
    p2: torch.Tensor | None = None,
    z1: torch.Tensor | None = None,
) -> torch.Tensor:
    """``2 - 2 cos(p, sg(z))`` averaged over the batch (the MSE of the L2-normalised vectors).

    Convention (Grill et al. 2020, and their code): ``p1`` is the online prediction of view 1,
    ``z2`` the target projection of view 2; targets are detached. With ``p2`` and ``z1`` the
    loss is symmetrised as BYOL does: ``L(p1, z2) + L(p2, z1)`` (a sum, not a mean).

    Distributed: per sample, nothing is gathered; each rank returns the mean over its samples
    (the global mean when ranks hold equal batches).
    """
    if (p2 is None) != (z1 is None):
        raise ValueError("the symmetric BYOL loss needs both p2 and z1 (or neither)")
    with fp32_region():
        loss = _regression(p1, z2, "p1", "z2")
        if p2 is not None:
            loss = loss + _regression(p2, z1, "p2", "z1")
        return loss


class BYOLLoss(nn.Module):
    """Module form of :func:`byol_loss`; see there for the convention. ``gather`` is accepted
    for a uniform constructor and validated; BYOL compares no sample with another."""

    def __init__(self, gather: str = "all") -> None:
        super().__init__()
        check_gather(gather)
        self.gather = gather

    def forward(
        self,
        p1: torch.Tensor,
        z2: torch.Tensor,
        p2: torch.Tensor | None = None,
        z1: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return byol_loss(p1, z2, p2, z1)
