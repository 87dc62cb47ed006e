"""BYOL (Grill et al. 2020): an online encoder, projector and predictor regress the momentum
target's projection of the other view.

Loss: ``BYOLLoss`` symmetrised, ``L(p1, sg(z2)) + L(p2, sg(z1))`` with ``L = 2 - 2 cos``; no
negatives. The target (encoder + projector) is the momentum twin of :class:`MomentumMethod`,
with BYOL's cosine schedule from ``method.momentum`` (0.996 in the paper) to
``method.momentum_final`` (1.0) over the run when ``method.momentum_schedule=cosine``.
"""

from __future__ import annotations

from dist_contrast.config import Config
from dist_contrast.losses import BYOLLoss
from dist_contrast.methods.base import LossOutput
from dist_contrast.methods.momentum import MomentumMethod, momentum_kwargs, online_networks
from dist_contrast.models import build_predictor


class BYOL(MomentumMethod):
    def __init__(self, encoder, projector, predictor, loss: BYOLLoss, **momentum) -> None:
        super().__init__(encoder, projector, predictor, **momentum)
        self.criterion = loss

    def embed_online(self, batch):
        return {"p1": self.online(batch["view1"]), "p2": self.online(batch["view2"])}

    def embed(self, batch):
        targets = {"z1": self.target(batch["view1"]), "z2": self.target(batch["view2"])}
        return {**self.embed_online(batch), **targets}

    def loss(self, emb, batch):
        z1, z2 = emb["z1"].detach(), emb["z2"].detach()
        return LossOutput(self.criterion(emb["p1"], z2, emb["p2"], z1))


def build(cfg: Config) -> BYOL:
    encoder, projector = online_networks(cfg)
    loss = BYOLLoss(cfg.loss.gather)
    return BYOL(encoder, projector, build_predictor(cfg.model), loss, **momentum_kwargs(cfg))
