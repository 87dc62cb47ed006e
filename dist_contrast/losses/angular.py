"""Angular loss (Wang et al. 2017), pytorch-metric-learning convention."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_contrast.losses.checks import check_finite, check_gather
from dist_contrast.losses.kernels.numerics import fp32_region, masked_logsumexp
from dist_contrast.losses.pairs import labelled_batch
from dist_contrast.losses.reduce import global_mean


def _check_alpha(alpha: float) -> None:
    a = check_finite(alpha, "alpha")
    if not 0 < a < 90:
        raise ValueError(f"alpha is an angle in degrees and must be in (0, 90), got {a}")


def angular_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 40.0,
    gather_mode: str = "all",
) -> torch.Tensor:
    """Angular loss in its N-pair form (eq. 8 of Wang et al.), alpha in degrees.

    Convention (pytorch-metric-learning ``AngularLoss``, alpha = 40): for every ordered
    positive pair (a, p), a != p, with x_a, x_p L2-normalised,
    ``log(1 + sum_n exp(4 tan^2(alpha) (x_a + x_p) . x_n - 2 (1 + tan^2(alpha)) x_a . x_p))``
    over the samples n of another label; the loss is the mean over all positive pairs, and 0
    when the batch has no positive pair or a single label. As in pml, x_n enters as the raw
    embedding (pml normalises only anchor and positive): feed L2-normalised embeddings to get
    the paper's form exactly.

    Distributed: anchors are this rank's rows; positives and negatives come from every rank
    (gathered with gradient, labels gathered). The number of positive pairs is known from the
    gathered labels and each rank returns ``W * (its sum) / (pairs)``: the rank mean and the
    rank-averaged gradients equal one process on the global batch.
    """
    _check_alpha(alpha)
    check_gather(gather_mode)
    with fp32_region():
        b = labelled_batch(embeddings, labels, gather_mode)
        pos, neg = b.masks()
        _, counts = torch.unique(b.col_labels, return_counts=True)
        n_pairs = int((counts * (counts - 1)).sum()) if len(counts) > 1 else 0
        a_idx, p_idx = torch.nonzero(pos, as_tuple=True)
        anchors, positives = b.rows[a_idx], b.cols[p_idx]
        sq_tan = math.tan(math.radians(alpha)) ** 2
        ap_dot = (anchors * positives).sum(dim=1, keepdim=True)
        logits = 4 * sq_tan * (anchors + positives) @ b.cols_raw.T - 2 * (1 + sq_tan) * ap_dot
        # log(1 + sum exp) = logsumexp with an extra 0 logit; no negative -> log(1) = 0
        padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)
        keep = torch.cat([neg[a_idx], neg.new_ones(len(a_idx), 1)], dim=1)
        total = masked_logsumexp(padded, keep).sum() if n_pairs else logits.sum() * 0
        return b.close(global_mean(total, n_pairs, b.gathered))


class AngularLoss(nn.Module):
    """Module form of :func:`angular_loss`; see there for the convention."""

    def __init__(self, alpha: float = 40.0, gather: str = "all") -> None:
        super().__init__()
        _check_alpha(alpha)
        check_gather(gather)
        self.alpha, self.gather = alpha, gather

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return angular_loss(embeddings, labels, self.alpha, self.gather)
