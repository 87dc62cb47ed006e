"""Encoders and heads. Model code knows nothing of ranks or DeepSpeed."""

from __future__ import annotations

from torch import nn

from dist_contrast.config import ModelConfig
from dist_contrast.models.heads import MLPHead
from dist_contrast.models.resnet import SmallResNet

ENCODERS = {"resnet_tiny": (1, 1, 1), "resnet_small": (2, 2, 2)}


def build_encoder(model: ModelConfig, in_channels: int, image_size: int) -> nn.Module:
    """The encoder ``model.encoder``; it exposes ``out_dim``, the width of its representation."""
    if model.encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {model.encoder!r}; choose one of {sorted(ENCODERS)}")
    return SmallResNet(in_channels, model.width, ENCODERS[model.encoder], model.norm)


def build_head(in_dim: int, model: ModelConfig, out_dim: int | None = None) -> MLPHead:
    """The projector of ``model``: ``in_dim`` -> ``out_dim`` (default ``model.proj_dim``)."""
    return MLPHead(
        in_dim,
        model.proj_hidden_dim,
        out_dim or model.proj_dim,
        model.proj_layers,
        model.proj_norm,
    )


def build_predictor(model: ModelConfig) -> MLPHead:
    """The predictor of BYOL / MoCo v3: ``proj_dim`` -> ``pred_hidden_dim`` -> ``proj_dim``."""
    return MLPHead(model.proj_dim, model.pred_hidden_dim, model.proj_dim, 2, model.proj_norm)


__all__ = ["ENCODERS", "MLPHead", "SmallResNet", "build_encoder", "build_head", "build_predictor"]
