"""Projection heads."""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """Linear -> ReLU -> Linear (SimCLR's projector, without batch norm so that ranks stay
    independent of each other's batch statistics)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
