"""Methods: batch -> embeddings -> loss. Built from the config by :func:`build_method`."""

from __future__ import annotations

from dist_contrast.config import Config
from dist_contrast.losses import NTXentLoss
from dist_contrast.methods.base import LossOutput, Method
from dist_contrast.methods.simclr import SimCLR
from dist_contrast.models import MLPHead, build_encoder


def build_encoder_from_config(cfg: Config):
    m = cfg.model
    return build_encoder(m.encoder, cfg.data.channels, m.width, m.norm)


def build_method(cfg: Config) -> Method:
    """The method of ``cfg``, with freshly initialised weights (seed them before calling)."""
    encoder = build_encoder_from_config(cfg)
    if cfg.method.name == "simclr":
        projector = MLPHead(encoder.out_dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim)
        loss = NTXentLoss(cfg.loss.temperature, cfg.loss.gather, cfg.loss.memory_efficient,
                          cfg.loss.tile if cfg.loss.memory_efficient else None)
        return SimCLR(encoder, projector, loss)
    raise ValueError(f"unknown method {cfg.method.name!r}")


__all__ = ["LossOutput", "Method", "SimCLR", "build_encoder_from_config", "build_method"]
