"""N-pair loss (Sohn 2016), pytorch-metric-learning convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses.checks import check_gather
from dist_contrast.losses.kernels.numerics import fp32_region
from dist_contrast.losses.pairs import labelled_batch
from dist_contrast.losses.reduce import global_mean


def first_two_per_label(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every label that occurs at least twice, the indices of its first and second
    occurrence, ordered by label."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = (counts.cumsum(0) - counts)[counts >= 2]
    return order[starts], order[starts + 1]


def n_pair_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, gather_mode: str = "all"
) -> torch.Tensor:
    """N-pair loss: one (anchor, positive) pair per class, the other pairs' positives as
    negatives, cross-entropy over the N positives.

    Convention (pytorch-metric-learning ``NPairsLoss``): for every label occurring at least
    twice, the anchor is its first sample and the positive its second; logits are dot products
    of L2-normalised embeddings (pml's default ``DotProductSimilarity`` normalises; no
    temperature, no L2 regulariser), and the loss is the mean cross-entropy over the pairs.

    Distributed: pairs are formed on the gathered (global) batch, positives come from every
    rank with gradient, and each rank scores the pairs whose anchor it holds. The pair count is
    known from the gathered labels, and each rank returns ``W * (its sum) / (pairs)``, so the
    rank mean and the rank-averaged gradients equal one process on the global batch.
    """
    check_gather(gather_mode)
    with fp32_region():
        b = labelled_batch(embeddings, labels, gather_mode)
        first, second = first_two_per_label(b.col_labels)
        n = b.rows.shape[0]
        owned = (first >= b.offset) & (first < b.offset + n)
        anchors = b.rows[first[owned] - b.offset]
        logits = anchors @ b.cols[second].T
        targets = torch.nonzero(owned).flatten()
        total = F.cross_entropy(logits, targets, reduction="sum")
        return b.close(global_mean(total, len(first), b.gathered))


class NPairLoss(nn.Module):
    """Module form of :func:`n_pair_loss`; see there for the convention."""

    def __init__(self, gather: str = "all") -> None:
        super().__init__()
        check_gather(gather)
        self.gather = gather

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return n_pair_loss(embeddings, labels, self.gather)
