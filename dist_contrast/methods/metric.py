"""Deep metric learning (method "metric"): a shared encoder and projector, both views of every
sample embedded and fed with their labels to a pairwise loss chosen by ``loss.name``:

- ``contrastive``: margin contrastive loss (``loss.pos_margin``, ``loss.neg_margin``);
- ``triplet``: triplet margin loss (``loss.margin``) with ``loss.mining`` all | hard
  (batch-hard) | semihard (semi-hard negatives within ``loss.margin``);
- ``npair``: N-pair loss. It needs one (anchor, positive) pair per class: the embeddings are
  laid out sample by sample, view 1 then view 2, so the pair of each class is the two views of
  the first sample of that class in the (global) batch, and the other classes' positives are
  its negatives;
- ``angular``: angular loss with alpha = ``loss.angle_deg``.

Embeddings are L2-normalised before the loss (the angular loss then has the paper's form; the
others normalise anyway). The losses gather embeddings and labels across ranks themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.config import Config
from dist_contrast.losses import AngularLoss, ContrastiveLoss, NPairLoss, TripletLoss
from dist_contrast.methods.base import LossOutput
from dist_contrast.methods.simclr import TwoViews
from dist_contrast.models import build_encoder, build_head

LOSSES = ("contrastive", "triplet", "npair", "angular")
# loss.mining -> TripletLoss's name for it
MINING = {"all": "all", "hard": "batch-hard", "semihard": "semi-hard"}


def pairwise_loss(cfg: Config) -> nn.Module:
    """The pairwise loss of ``cfg.loss`` (its name must be one of :data:`LOSSES`)."""
    name, c = cfg.loss.name, cfg.loss  # one of LOSSES (methods.registry)
    if name == "contrastive":
        return ContrastiveLoss(c.pos_margin, c.neg_margin, c.gather)
    if name == "triplet":
        return TripletLoss(c.margin, MINING[c.mining], gather=c.gather)
    if name == "npair":
        return NPairLoss(c.gather)
    return AngularLoss(c.angle_deg, c.gather)


class Metric(TwoViews):
    def loss(self, emb: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> LossOutput:
        z, labels = interleave(emb["z1"], emb["z2"], self.labels(batch, "metric"))
        return LossOutput(self.criterion(F.normalize(z.float(), dim=1), labels))


def interleave(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, D] embeddings ordered sample by sample (view 1, view 2) and their [2B] labels."""
    z = torch.stack([z1, z2], dim=1).reshape(2 * z1.shape[0], -1)
    return z, labels.repeat_interleave(2)


def build(cfg: Config) -> Metric:
    loss = pairwise_loss(cfg)
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    projector = build_head(encoder.out_dim, cfg.model)
    return Metric(encoder, projector, loss)
