"""Supervised contrastive loss (SupCon, Khosla et al. 2020), SupContrast reference convention."""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.losses.checks import (
    check_choice,
    check_gather,
    check_input,
    check_labels,
    check_positive,
    check_temperature,
    check_tiling,
)
from dist_contrast.losses.kernels import tiled
from dist_contrast.losses.kernels.numerics import fp32_region, masked_logsumexp, normalize
from dist_contrast.losses.reduce import gather, gather_labels, global_mean

MODES = ("all", "one")


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    gather_mode: str = "all",
    *,
    memory_efficient: bool = False,
    tile: int | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss L_out over N samples with V views each.

    Convention (the SupContrast reference, ``SupConLoss``): ``features`` [N, V, D] are
    L2-normalised here (the reference expects the caller to do it); every view is an anchor
    (``contrast_mode="all"``; ``"one"``: only view 0) and every other view of the batch is a
    contrast sample. The positives of an anchor are the other views with its label (without
    ``labels``: the other views of the same sample, which is SimCLR's loss, = NT-Xent for V = 2
    when temperature == base_temperature). Anchor loss:
    ``-(T / base_T) * mean over positives p of log(exp(s_ap / T) / sum_{c != a} exp(s_ac / T))``.
    The loss is the mean over all anchors; an anchor without positives contributes 0 and
    still counts in the mean (the reference's ``mask_pos_pairs`` clamp to 1).

    Distributed: anchors are this rank's views; contrast samples are the views of every rank
    (gathered with gradient), labels gathered, instance ids and the self-mask offset by rank.
    Each rank returns ``W * (sum over its anchors) / (anchors on all ranks)``, so W ranks with
    averaged gradients equal one process on the global batch. Memory O(nV x NV).

    ``memory_efficient=True``: the same values and gradients through the tiled softmax
    (:mod:`dist_contrast.losses.kernels.tiled`): self views left out and positives found from the
    label vectors, never an [nV, NV] logit matrix or mask (memory O(tile^2), default 1024).
    """
    check_input(features, "features", ndim=3)
    if labels is not None:
        check_labels(labels, features.shape[0])
    check_temperature(temperature)
    check_positive(base_temperature, "base_temperature")
    check_choice(contrast_mode, "contrast_mode", MODES)
    use_gather = check_gather(gather_mode)
    check_tiling(memory_efficient, tile)
    with fp32_region():
        f = normalize(features)
        n, views = f.shape[0], f.shape[1]
        cols, offset = gather(f, use_gather)  # [N, V, D]
        n_all = cols.shape[0]
        anchors = f if contrast_mode == "all" else f[:, :1]
        a_views = anchors.shape[1]
        anchors = anchors.reshape(n * a_views, -1)
        cols = cols.reshape(n_all * views, -1)
        dev = anchors.device
        row_sample = (torch.arange(n, device=dev) + offset).repeat_interleave(a_views)
        row_view = torch.arange(a_views, device=dev).repeat(n)
        self_col = row_sample * views + row_view
        if labels is None:
            row_id = row_sample
            col_id = torch.arange(n_all, device=dev).repeat_interleave(views)
        else:
            labels = labels.to(dev)
            row_id = labels.repeat_interleave(a_views)
            col_id = gather_labels(labels, use_gather).repeat_interleave(views)
        if memory_efficient:
            per_anchor = tiled.tiled_cross_entropy(
                anchors,
                cols,
                row_labels=row_id,
                col_labels=col_id,
                exclude=self_col,
                scale=1 / temperature,
                tile=tile,
            )
            per_anchor = (temperature / base_temperature) * per_anchor
        else:
            per_anchor = _full_per_anchor(anchors, cols, row_id, col_id, self_col, temperature)
            per_anchor = -(temperature / base_temperature) * per_anchor
        return global_mean(per_anchor.sum(), n_all * a_views, use_gather)


def _full_per_anchor(anchors, cols, row_id, col_id, self_col, temperature) -> torch.Tensor:
    """Mean log-probability of each anchor's positives (0 without any), from the whole
    [nV, NV] logits and masks."""
    logits = anchors @ cols.T
    logits = logits / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(self_col), device=logits.device), self_col] = True
    pos = (row_id[:, None] == col_id[None, :]) & ~self_mask
    log_prob = logits - masked_logsumexp(logits, ~self_mask)[:, None]
    n_pos = pos.sum(dim=1)
    return torch.where(pos, log_prob, 0.0).sum(dim=1) / n_pos.clamp(min=1)


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss`; see there for the convention."""

    def __init__(
        self,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        contrast_mode: str = "all",
        gather: str = "all",
        memory_efficient: bool = False,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_positive(base_temperature, "base_temperature")
        check_choice(contrast_mode, "contrast_mode", MODES)
        check_gather(gather)
        check_tiling(memory_efficient, tile)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.contrast_mode, self.gather = contrast_mode, gather
        self.memory_efficient, self.tile = memory_efficient, tile

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return supcon_loss(
            features,
            labels,
            self.temperature,
            self.base_temperature,
            self.contrast_mode,
            self.gather,
            memory_efficient=self.memory_efficient,
            tile=self.tile,
        )
