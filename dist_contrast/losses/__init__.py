"""Objectives: pure functions plus thin nn.Module wrappers. Distributed-aware, no model code.

Every function takes tensors, hyperparameters and ``gather_mode`` ("all": compare with the
samples of every rank, gathered with gradient; "off": this rank's batch only); every module
takes the hyperparameters and ``gather``. Each docstring states the convention followed.
"""

from dist_contrast.losses.angular import AngularLoss, angular_loss
from dist_contrast.losses.byol import BYOLLoss, byol_loss
from dist_contrast.losses.clip import ClipLoss, clip_loss
from dist_contrast.losses.contrastive import ContrastiveLoss, contrastive_loss
from dist_contrast.losses.dcl import DCLLoss, dcl_loss
from dist_contrast.losses.infonce import InfoNCELoss, info_nce
from dist_contrast.losses.nce import NCELoss, estimate_nce_z, nce_loss
from dist_contrast.losses.npair import NPairLoss, n_pair_loss
from dist_contrast.losses.ntxent import NTXentLoss, nt_xent
from dist_contrast.losses.siglip import SigLipLoss, siglip_loss
from dist_contrast.losses.supcon import SupConLoss, supcon_loss
from dist_contrast.losses.triplet import TripletLoss, triplet_loss

__all__ = [
    "AngularLoss",
    "BYOLLoss",
    "ClipLoss",
    "ContrastiveLoss",
    "DCLLoss",
    "InfoNCELoss",
    "NCELoss",
    "NPairLoss",
    "NTXentLoss",
    "SigLipLoss",
    "SupConLoss",
    "TripletLoss",
    "angular_loss",
    "byol_loss",
    "clip_loss",
    "contrastive_loss",
    "dcl_loss",
    "estimate_nce_z",
    "info_nce",
    "n_pair_loss",
    "nce_loss",
    "nt_xent",
    "siglip_loss",
    "supcon_loss",
    "triplet_loss",
]
