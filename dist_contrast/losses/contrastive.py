"""Margin contrastive loss (Hadsell, Chopra, LeCun 2006), pytorch-metric-learning convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses.checks import check_finite, check_gather
from dist_contrast.losses.kernels.numerics import fp32_region
from dist_contrast.losses.pairs import labelled_batch, nonzero_means


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    gather_mode: str = "all",
) -> torch.Tensor:
    """Contrastive loss over all pairs of a labelled batch.

    Convention (pytorch-metric-learning ``ContrastiveLoss`` with its defaults): d is the
    Euclidean distance between L2-normalised embeddings; every ordered pair (i, j), i != j, of
    the same label is positive with loss ``relu(d - pos_margin)``, every pair of different
    labels negative with loss ``relu(neg_margin - d)``. Each of the two sets is averaged over
    its non-zero losses (``AvgNonZeroReducer``) and the two averages are added.

    Distributed: rows are this rank's anchors, columns every rank's embeddings (gathered with
    gradient, labels gathered, the self pair offset by rank). The numbers of non-zero pair
    losses are all-reduced, and each rank returns ``W * (its sum) / (global count)``, so the
    mean over ranks, and the rank-averaged gradients, are those of one process on the global
    batch. ``gather_mode="off"``: each rank's own batch only.
    """
    check_finite(pos_margin, "pos_margin")
    check_finite(neg_margin, "neg_margin")
    check_gather(gather_mode)
    with fp32_region():
        b = labelled_batch(embeddings, labels, gather_mode)
        d = b.distances()
        pos, neg = b.masks()
        zero = d.new_zeros(())
        pos_l = torch.where(pos, F.relu(d - pos_margin), zero)
        neg_l = torch.where(neg, F.relu(neg_margin - d), zero)
        loss = nonzero_means(
            [pos_l.sum(), neg_l.sum()], [(pos_l > 0).sum(), (neg_l > 0).sum()], b.gathered
        )
        return b.close(loss)


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`; see there for the convention."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, gather: str = "all"):
        super().__init__()
        check_finite(pos_margin, "pos_margin")
        check_finite(neg_margin, "neg_margin")
        check_gather(gather)
        self.pos_margin, self.neg_margin, self.gather = pos_margin, neg_margin, gather

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(embeddings, labels, self.pos_margin, self.neg_margin, self.gather)
