"""Decoupled contrastive loss (DCL / DCLW, Yeh et al. 2022)."""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.losses.checks import check_gather, check_positive, check_temperature
from dist_contrast.losses.kernels.numerics import column_mask, fp32_region, masked_logsumexp
from dist_contrast.losses.ntxent import two_views
from dist_contrast.losses.reduce import gather, global_mean


def dcl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    sigma: float | None = None,
    gather_mode: str = "all",
) -> torch.Tensor:
    """Decoupled contrastive loss: NT-Xent with the positive taken out of the denominator.

    Convention (Yeh et al. 2022): the anchors, positives and 2N - 2 negatives of
    :func:`nt_xent`; anchor i's loss is ``-w_i s_ip / T + log sum_{n negative} exp(s_in / T)``
    with s the cosine similarity. ``sigma=None`` is DCL (w = 1); a ``sigma`` gives DCLW, the
    von Mises-Fisher weighting ``w_i = 2 - N softmax_j(s_jj' / sigma)_i`` over the N positive
    pairs (not detached, as in the authors' code). The loss is the mean over all 2N anchors;
    the authors' code returns the sum of the two directions, i.e. twice this value. An anchor
    without any negative (N = 1) contributes 0.

    Distributed: as :func:`nt_xent` (local anchors against gathered views, global N); for DCLW
    the N positive similarities are gathered with gradient too, so the softmax is global.
    """
    use_gather = check_gather(gather_mode)
    check_temperature(temperature)
    if sigma is not None:
        check_positive(sigma, "sigma")
    with fp32_region():
        v = two_views(z1, z2, temperature, gather_mode)
        n2 = v.logits.shape[0]
        rows = torch.arange(n2, device=v.logits.device)
        cols = 2 * v.n_all
        keep = column_mask(n2, cols, v.self_col, False)
        keep[rows, v.pos_col] = False
        pos_term = -v.logits[rows, v.pos_col]
        if sigma is not None:
            pair_sim, _ = gather((v.a1 * v.a2).sum(dim=1), use_gather)
            weight = 2 - v.n_all * torch.softmax(pair_sim / sigma, dim=0)
            local = weight[v.offset : v.offset + n2 // 2]
            pos_term = pos_term * torch.cat([local, local])
        per_anchor = pos_term + masked_logsumexp(v.logits, keep)
        per_anchor = torch.where(keep.any(dim=1), per_anchor, 0.0)
        return global_mean(per_anchor.sum(), cols, use_gather)


class DCLLoss(nn.Module):
    """Module form of :func:`dcl_loss`; see there for the convention."""

    def __init__(
        self, temperature: float = 0.1, sigma: float | None = None, gather: str = "all"
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if sigma is not None:
            check_positive(sigma, "sigma")
        check_gather(gather)
        self.temperature, self.sigma, self.gather = temperature, sigma, gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return dcl_loss(z1, z2, self.temperature, self.sigma, self.gather)

    def negatives_per_query(self, n_local: int, world: int) -> int:
        n = n_local * (world if self.gather == "all" else 1)
        return 2 * n - 2
