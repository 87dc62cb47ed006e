"""Projection and prediction heads."""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.models.layers import BatchNorm1d


class MLPHead(nn.Module):
    """``layers`` linear layers with ReLU between them: Linear -> [BN] -> ReLU -> ... -> Linear.

    Two layers without batch norm is SimCLR's projector as used here (ranks stay independent of
    each other's batch statistics); ``norm=True`` puts batch norm after every hidden layer (BYOL,
    MoCo v3 projectors and predictors)."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, norm: bool = False
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a head needs at least one layer, got layers={layers}")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden_dim, bias=not norm))
            if norm:
                mods.append(BatchNorm1d(hidden_dim))
            mods.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
