"""SimCLR (Chen et al. 2020): two views, a shared encoder and projector, NT-Xent."""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.losses import NTXentLoss
from dist_contrast.methods.base import LossOutput, Method


class SimCLR(Method):
    def __init__(self, encoder: nn.Module, projector: nn.Module, loss: NTXentLoss) -> None:
        super().__init__()
        self.encoder, self.projector, self.loss = encoder, projector, loss

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        # One encoder pass over both views; the loss splits them again.
        both = torch.cat([batch["view1"], batch["view2"]])
        z1, z2 = self.embed(both).chunk(2)
        return LossOutput(self.loss(z1, z2))

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        return self.loss.negatives_per_query(batch_size, world)
