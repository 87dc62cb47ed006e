"""Pairwise sigmoid image-text loss with a learnable bias (SigLIP, Zhai et al. 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dist_contrast.losses.checks import check_finite, check_gather
from dist_contrast.losses.clip import ImageTextLoss, check_pair
from dist_contrast.losses.kernels.numerics import fp32_region, normalize, upcast
from dist_contrast.losses.reduce import gather, global_mean

SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor = SIGLIP_INIT_LOGIT_SCALE,
    logit_bias: float | torch.Tensor = -10.0,
    gather_mode: str = "all",
    local: bool = True,
) -> torch.Tensor:
    """SigLIP: an independent binary classification for every image-text pair.

    Convention (Zhai et al. 2023): both sides L2-normalised, logits
    ``exp(logit_scale) * image @ text.T + logit_bias``, label +1 for the matching pair and -1
    otherwise, loss ``-sum_ij log sigmoid(label_ij * logit_ij) / B``: summed over all texts,
    averaged over the images. ``logit_scale`` (log of the scale, init log 10) and
    ``logit_bias`` (init -10) are the learnable parameters.

    Distributed: each rank scores its images against the texts of every rank (gathered with
    gradient; the positive of local image i is global text ``offset + i``), memory
    O(n_local x N), and returns ``W * (its sum) / N``: W ranks with averaged gradients equal
    one process on the global batch. ``local=False``: every rank scores the whole gathered
    [N, N] matrix and returns the global loss (see :func:`dist_contrast.losses.clip_loss`).
    """
    check_pair(image, text)
    check_finite(logit_scale, "logit_scale")
    check_finite(logit_bias, "logit_bias")
    use_gather = check_gather(gather_mode)
    with fp32_region():
        img, txt = normalize(image), normalize(text)
        all_txt, offset = gather(txt, use_gather)
        if not local:
            img, _ = gather(img, use_gather)
            offset = 0
        scale = upcast(torch.as_tensor(logit_scale, device=img.device)).exp()
        bias = upcast(torch.as_tensor(logit_bias, device=img.device))
        logits = scale * img @ all_txt.T + bias
        n = img.shape[0]
        signs = -torch.ones_like(logits)
        signs[torch.arange(n, device=img.device), torch.arange(n, device=img.device) + offset] = 1
        total = -F.logsigmoid(signs * logits).sum()
        if not local:
            return total / all_txt.shape[0]
        return global_mean(total, all_txt.shape[0], use_gather)


class SigLipLoss(ImageTextLoss):
    """:func:`siglip_loss` with learnable ``logit_scale`` (init log 10) and ``logit_bias``
    (init -10), as in the SigLIP paper."""

    def __init__(
        self,
        init_scale: float = 10.0,
        init_bias: float = -10.0,
        gather: str = "all",
        local: bool = True,
    ) -> None:
        if not check_finite(init_scale, "init_scale") > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        super().__init__(math.log(init_scale), gather, init_bias=init_bias)
        self.local = local

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return siglip_loss(
            image, text, self.logit_scale[0], self.logit_bias[0], self.gather, self.local
        )
