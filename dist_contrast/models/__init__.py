"""Encoders and heads. Model code knows nothing of ranks or DeepSpeed."""

from __future__ import annotations

from torch import nn

from dist_contrast.models.heads import MLPHead
from dist_contrast.models.resnet import SmallResNet

ENCODERS = {"resnet_tiny": (1, 1, 1), "resnet_small": (2, 2, 2)}


def build_encoder(name: str, in_channels: int, width: int, norm: str) -> nn.Module:
    """An encoder by name; it exposes ``out_dim``, the width of its representation."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return SmallResNet(in_channels, width, ENCODERS[name], norm)


__all__ = ["ENCODERS", "MLPHead", "SmallResNet", "build_encoder"]
