"""What the label-based pairwise losses share: this rank's rows against the gathered columns.

Each rank scores only its own anchors (rows) against the embeddings of every rank (columns,
gathered with gradient), so memory is O(B_local x B_global). Labels are gathered, and the self
pair of row i is column ``offset + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_contrast.losses.checks import check_gather, check_input, check_labels
from dist_contrast.losses.kernels.numerics import column_mask, normalize, upcast
from dist_contrast.losses.reduce import (
    all_reduce_sum,
    gather,
    gather_labels,
    global_mean,
    keep_graph,
)


@dataclass
class LabelledBatch:
    rows: torch.Tensor  # this rank's embeddings, L2-normalised, [n, D]
    cols: torch.Tensor  # every rank's embeddings (or this rank's), L2-normalised, [N, D]
    cols_raw: torch.Tensor  # the same before normalisation (AngularLoss uses them)
    row_labels: torch.Tensor  # [n]
    col_labels: torch.Tensor  # [N]
    offset: int  # column of row 0
    gathered: bool

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) pair masks [n, N]: same label but not self; other label."""
        same = self.row_labels[:, None] == self.col_labels[None, :]
        n = self.rows.shape[0]
        own = torch.arange(n, device=same.device) + self.offset
        not_self = column_mask(n, self.cols.shape[0], own, False)
        return same & not_self, ~same

    def distances(self) -> torch.Tensor:
        """Euclidean distances [n, N] between normalised embeddings, as pml's default
        ``LpDistance(p=2, normalize_embeddings=True)`` (``torch.cdist``, gradient 0 at 0)."""
        return torch.cdist(self.rows, self.cols)

    def close(self, loss: torch.Tensor) -> torch.Tensor:
        """Keep the gathered columns in the graph whatever the loss used (see keep_graph)."""
        return keep_graph(loss, self.cols_raw)


def labelled_batch(
    embeddings: torch.Tensor, labels: torch.Tensor, gather_mode: str
) -> LabelledBatch:
    """Validate and gather. Call inside ``fp32_region()``."""
    check_input(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0])
    enabled = check_gather(gather_mode)
    labels = labels.to(embeddings.device)
    raw = upcast(embeddings)
    cols_raw, offset = gather(raw, enabled)
    return LabelledBatch(
        rows=normalize(raw),
        cols=normalize(cols_raw),
        cols_raw=cols_raw,
        row_labels=labels,
        col_labels=gather_labels(labels, enabled),
        offset=offset,
        gathered=enabled,
    )


def nonzero_means(
    sums: list[torch.Tensor], counts: list[torch.Tensor], gathered: bool
) -> torch.Tensor:
    """Sum over terms of (sum of the losses) / (number of non-zero losses), the number taken
    over every rank (pml's AvgNonZeroReducer on the global batch, summed over sub-losses as
    pml's MultipleReducers do). A term with no non-zero loss contributes 0."""
    total = all_reduce_sum(torch.stack(counts), gathered)
    return sum(global_mean(s, c, gathered) for s, c in zip(sums, total, strict=True))
