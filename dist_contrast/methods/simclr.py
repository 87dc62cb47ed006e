"""SimCLR (Chen et al. 2020): two views, a shared encoder and projector, NT-Xent.

Method "dcl" is the same structure trained with the decoupled contrastive loss (DCL, Yeh et al.
2022: the positive pair left out of the softmax denominator), ``loss.name=dcl``.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.losses import DCLLoss, NTXentLoss
from dist_contrast.methods.base import LossOutput, Method
from dist_contrast.models import build_encoder, build_head


class TwoViews(Method):
    """Two views of each image through one encoder and projector: ``z1``, ``z2``. SimCLR, DCL,
    SupCon and the pairwise (metric) methods differ only in their loss."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector, self.criterion = encoder, projector, loss

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One encoder pass over both views.
        both = torch.cat([batch["view1"], batch["view2"]])
        z1, z2 = self.projector(self.encoder(both)).chunk(2)
        return {"z1": z1, "z2": z2}

    def labels(self, batch: dict[str, torch.Tensor], method: str) -> torch.Tensor:
        """The batch's labels, for the methods supervised by them."""
        if "label" not in batch:
            raise ValueError(f"method '{method}' needs labelled samples (a 'label' in the batch)")
        return batch["label"]

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        """Views of other samples each anchor is compared with (2N - 2, as SimCLR); with labels,
        which of them are negatives depends on the labels."""
        n = batch_size * (world if self.criterion.gather == "all" else 1)
        return 2 * n - 2


class SimCLR(TwoViews):
    def loss(self, emb: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> LossOutput:
        return LossOutput(self.criterion(emb["z1"], emb["z2"]))

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        return self.criterion.negatives_per_query(batch_size, world)


def _criterion(cfg: Config) -> nn.Module:
    if cfg.loss.name == "dcl":  # method "dcl" (the registry pairs each method with its loss)
        return DCLLoss(cfg.loss.temperature, gather=cfg.loss.gather)
    return NTXentLoss(
        cfg.loss.temperature,
        cfg.loss.gather,
        cfg.loss.memory_efficient,
        cfg.loss.tile if cfg.loss.memory_efficient else None,
    )


def build(cfg: Config) -> SimCLR:
    """SimCLR ("simclr", NT-Xent) or DCL ("dcl", DCLLoss) from ``cfg``."""
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    projector = build_head(encoder.out_dim, cfg.model)
    return SimCLR(encoder, projector, _criterion(cfg))
