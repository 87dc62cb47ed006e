"""SupCon (Khosla et al. 2020): two views, a shared encoder and projector, the supervised
contrastive loss over both views with the batch's labels.

The loss sees the projections as [B, 2, D] with the labels of the batch; it gathers both across
ranks itself (views with gradient), so every view of the global batch is a contrast sample.
``base_temperature`` is set to ``loss.temperature``: the loss is not rescaled by T / base_T
(the SupContrast reference's factor is 1 at its defaults T = base_T = 0.07).
"""

from __future__ import annotations

import torch

from dist_contrast.config import Config
from dist_contrast.losses import SupConLoss
from dist_contrast.methods.base import LossOutput
from dist_contrast.methods.simclr import TwoViews
from dist_contrast.models import build_encoder, build_head


class SupCon(TwoViews):
    def loss(self, emb: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> LossOutput:
        features = torch.stack([emb["z1"], emb["z2"]], dim=1)  # [B, 2, D]
        return LossOutput(self.criterion(features, self.labels(batch, "supcon")))


def build(cfg: Config) -> SupCon:
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    projector = build_head(encoder.out_dim, cfg.model)
    loss = SupConLoss(
        cfg.loss.temperature,
        base_temperature=cfg.loss.temperature,
        gather=cfg.loss.gather,
        memory_efficient=cfg.loss.memory_efficient,
        tile=cfg.loss.tile if cfg.loss.memory_efficient else None,
    )
    return SupCon(encoder, projector, loss)
