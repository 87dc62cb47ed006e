"""Triplet margin loss with all / batch-hard / semi-hard mining (FaceNet, Schroff 2015),
pytorch-metric-learning convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses.checks import check_choice, check_finite, check_gather
from dist_contrast.losses.kernels.numerics import fp32_region
from dist_contrast.losses.pairs import labelled_batch, nonzero_means

MINING = ("all", "batch-hard", "semi-hard")


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.05,
    mining: str = "all",
    semihard_margin: float | None = None,
    gather_mode: str = "all",
) -> torch.Tensor:
    """Triplet margin loss ``relu(d(a, p) - d(a, n) + margin)``.

    Convention (pytorch-metric-learning ``TripletMarginLoss``, default margin 0.05): d is the
    Euclidean distance between L2-normalised embeddings; the loss is averaged over the triplets
    with a non-zero loss (``AvgNonZeroReducer``). Which triplets:

    - ``"all"``: every (a, p, n) with label(p) == label(a), p != a, label(n) != label(a)
      (pml's default ``triplets_per_anchor="all"``);
    - ``"batch-hard"``: per anchor the farthest positive and the closest negative, anchors
      without either skipped (pml ``BatchHardMiner``, Hermans et al. 2017);
    - ``"semi-hard"``: the triplets of "all" with ``0 < d(a, n) - d(a, p) <= semihard_margin``
      (FaceNet's semi-hard negatives; pml ``TripletMarginMiner(type_of_triplets="semihard")``
      with its margin = ``semihard_margin``, by default ``margin``).

    "all" and "semi-hard" are computed without materialising the B x B x B triplets: per
    anchor the negative distances are sorted, and the violating negatives of each positive form
    a contiguous run whose count and sum come from a prefix sum (fp64), so memory is
    O(B_local x B_global) and time O(B_local x B_global log B_global).

    Distributed: anchors are this rank's rows, positives and negatives come from every rank
    (gathered with gradient, labels gathered). The number of non-zero triplets is all-reduced
    and each rank returns ``W * (its sum) / (global count)``: the rank mean and the
    rank-averaged gradients equal one process on the global batch.
    """
    check_finite(margin, "margin")
    check_choice(mining, "mining", MINING)
    if semihard_margin is not None:
        check_finite(semihard_margin, "semihard_margin")
    check_gather(gather_mode)
    with fp32_region():
        b = labelled_batch(embeddings, labels, gather_mode)
        d = b.distances()
        pos, neg = b.masks()
        if mining == "batch-hard":
            total, count = _batch_hard(d, pos, neg, margin)
        else:
            window = None
            if mining == "semi-hard":
                window = margin if semihard_margin is None else semihard_margin
            total, count = _triplet_runs(d, pos, neg, margin, window)
        return b.close(nonzero_means([total.to(d.dtype)], [count], b.gathered))


def _batch_hard(d, pos, neg, margin):
    inf = d.new_tensor(float("inf"))
    hardest_pos = torch.where(pos, d, -inf).max(dim=1).values
    hardest_neg = torch.where(neg, d, inf).min(dim=1).values
    valid = pos.any(dim=1) & neg.any(dim=1)
    losses = torch.where(valid, F.relu(hardest_pos - hardest_neg + margin), d.new_zeros(()))
    return losses.sum(), (losses > 0).sum()


def _padded_positives(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's positives, padded to the largest count: [n, k] column indices
    and a validity mask (k = 3 for classes of 4 samples, whatever the batch size)."""
    counts = pos.sum(dim=1)
    k = int(counts.max()) if pos.numel() else 0
    a_idx, p_idx = torch.nonzero(pos, as_tuple=True)
    slot = torch.arange(len(a_idx), device=pos.device) - (counts.cumsum(0) - counts)[a_idx]
    cols = torch.zeros(pos.shape[0], k, dtype=torch.long, device=pos.device)
    valid = torch.zeros(pos.shape[0], k, dtype=torch.bool, device=pos.device)
    cols[a_idx, slot] = p_idx
    valid[a_idx, slot] = True
    return cols, valid


def _triplet_runs(d, pos, neg, margin, window):
    """Sum and count of the non-zero triplet losses of each anchor row of ``d``.

    For anchor a and positive p, the negatives with a non-zero loss are those with
    d(a, n) < d(a, p) + margin (and, semi-hard, d(a, p) < d(a, n) <= d(a, p) + window): a run
    [lo, hi) of a's sorted negative distances. Their losses add up to
    ``(hi - lo) * (d(a, p) + margin) - (prefix[hi] - prefix[lo])`` (sums in fp64)."""
    sorted_neg = torch.sort(torch.where(neg, d, float("inf")), dim=1).values
    finite = torch.where(torch.isfinite(sorted_neg), sorted_neg.double(), 0.0)
    prefix = F.pad(finite.cumsum(dim=1), (1, 0))  # prefix[:, j]: sum of the j closest
    cols, valid = _padded_positives(pos)
    ap = d.gather(1, cols)  # [n, k] anchor-positive distances
    keys, query = sorted_neg.detach().contiguous(), ap.detach()
    hi = torch.searchsorted(keys, (query + margin).contiguous(), side="left")
    if window is None:
        lo = torch.zeros_like(hi)
    else:
        lo = torch.searchsorted(keys, query.contiguous(), side="right")
        top = torch.searchsorted(keys, (query + window).contiguous(), side="right")
        hi = torch.minimum(hi, top)
        lo = torch.minimum(lo, hi)
    count = torch.where(valid, hi - lo, 0)
    run_sum = prefix.gather(1, hi) - prefix.gather(1, lo)
    total = torch.where(valid, count * (ap.double() + margin) - run_sum, 0.0)
    return total.sum(), count.sum()


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_loss`; see there for the convention."""

    def __init__(
        self,
        margin: float = 0.05,
        mining: str = "all",
        semihard_margin: float | None = None,
        gather: str = "all",
    ) -> None:
        super().__init__()
        check_finite(margin, "margin")
        check_choice(mining, "mining", MINING)
        if semihard_margin is not None:
            check_finite(semihard_margin, "semihard_margin")
        check_gather(gather)
        self.margin, self.mining, self.semihard_margin = margin, mining, semihard_margin
        self.gather = gather

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return triplet_loss(
            embeddings, labels, self.margin, self.mining, self.semihard_margin, self.gather
        )
