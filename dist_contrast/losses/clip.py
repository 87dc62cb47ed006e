"""Symmetric image-text contrastive loss with a learnable temperature (CLIP, Radford 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast.losses.checks import (
    check_finite,
    check_gather,
    check_input_pair,
    check_positive,
    check_tiling,
)
from dist_contrast.losses.kernels import tiled
from dist_contrast.losses.kernels.numerics import fp32_region, normalize, upcast
from dist_contrast.losses.reduce import gather, global_mean

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


def check_pair(image: torch.Tensor, text: torch.Tensor) -> None:
    check_input_pair(image, text, "image", "text")


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor = CLIP_INIT_LOGIT_SCALE,
    max_scale: float = 100.0,
    gather_mode: str = "all",
    *,
    memory_efficient: bool = False,
    tile: int | None = None,
    local: bool = True,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the image-text similarity matrix.

    Convention (Radford et al. 2021): ``image[i]`` and ``text[i]`` are a pair; both are
    L2-normalised, logits are ``exp(logit_scale) * image @ text.T`` with the scale clipped at
    ``max_scale`` (100), and the loss is the mean of the image->text and text->image
    cross-entropies, each averaged over the pairs. ``logit_scale`` is the log of the scale
    (the learnable parameter, initialised to log(1/0.07)); above ``log(max_scale)`` it gets no
    gradient.

    Distributed (open_clip's local loss): each rank scores its images against the texts of
    every rank and its texts against every rank's images (gathered with gradient, targets
    offset by rank), memory O(n_local x N), and returns ``W * (its sum) / 2N``: W ranks with
    averaged gradients (the logit scale's included) equal one process on the global batch.

    ``memory_efficient=True``: the same values and gradients (the logit scale's included)
    through the tiled softmax (:mod:`dist_contrast.losses.kernels.tiled`); the [n_local, N] logits
    exist one ``tile x tile`` block at a time (default 1024).

    ``local=False`` (open_clip's ``local_loss=False``): every rank scores the whole gathered
    [N, N] matrix and returns the global loss itself (the same value on every rank); the
    gather's backward sums the W identical gradients, DeepSpeed's average divides them again:
    the same gradients as the local form, at O(N^2) memory per rank. Not tiled.
    """
    check_pair(image, text)
    check_finite(logit_scale, "logit_scale")
    check_positive(max_scale, "max_scale")
    use_gather = check_gather(gather_mode)
    check_tiling(memory_efficient, tile)
    if not local and memory_efficient:
        raise ValueError("local=False scores the full matrix: it cannot be tiled")
    with fp32_region():
        img, txt = normalize(image), normalize(text)
        all_img, offset = gather(img, use_gather)
        all_txt, _ = gather(txt, use_gather)
        log_scale = torch.as_tensor(logit_scale, device=img.device)
        scale = upcast(log_scale).exp().clamp(max=max_scale)
        if not local:
            return _full_matrix_loss(all_img, all_txt, scale)
        targets = torch.arange(img.shape[0], device=img.device) + offset
        if memory_efficient:
            total = tiled.tiled_cross_entropy(img, all_txt, targets, scale=scale, tile=tile).sum()
            total = (
                total
                + tiled.tiled_cross_entropy(txt, all_img, targets, scale=scale, tile=tile).sum()
            )
        else:
            total = F.cross_entropy(scale * img @ all_txt.T, targets, reduction="sum")
            total = total + F.cross_entropy(scale * txt @ all_img.T, targets, reduction="sum")
        return global_mean(total / 2, all_img.shape[0], use_gather)


def _full_matrix_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean of the two cross-entropies over the whole [N, N] matrix of normalised rows."""
    logits = scale * img @ txt.T
    targets = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ImageTextLoss(nn.Module):
    """What CLIP's and SigLIP's modules share: the learnable logit scale (the log of the factor
    the logits are multiplied by), with ``init_bias`` SigLIP's logit bias, and the gather of the
    other side's features from every rank (``gather`` "all" or "off"). The one place the scale
    and the bias are held: the trainer (:mod:`dist_contrast.methods.clip`) uses these modules.

    One-element parameters, not 0-dim: DeepSpeed broadcasts parameters as byte views, which a
    0-dim tensor cannot give. ``max_scale`` clamps the scale (CLIP); None leaves it free."""

    def __init__(
        self,
        init_log_scale: float,
        gather: str,
        *,
        init_bias: float | None = None,
        max_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_finite(init_log_scale, "init_log_scale")
        if max_scale is not None:
            check_positive(max_scale, "max_scale")
        check_gather(gather)
        self.gather, self.max_scale = gather, max_scale
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_log_scale)))
        if init_bias is not None:
            check_finite(init_bias, "init_bias")
            self.logit_bias = nn.Parameter(torch.full((1,), float(init_bias)))

    def scale(self) -> torch.Tensor:
        """exp(logit scale), clamped at ``max_scale`` where there is one."""
        s = self.logit_scale[0].exp()
        return s if self.max_scale is None else s.clamp(max=self.max_scale)

    def negatives_per_query(self, n_local: int, world: int) -> int:
        return n_local * (world if self.gather == "all" else 1) - 1


class ClipLoss(ImageTextLoss):
    """:func:`clip_loss` with the learnable ``logit_scale`` (log of 1/T, init log(1/0.07)),
    the one module CLIP's trainer (:mod:`dist_contrast.methods.clip`) uses too."""

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_scale: float = 100.0,
        gather: str = "all",
        memory_efficient: bool = False,
        tile: int | None = None,
        local: bool = True,
    ) -> None:
        check_positive(init_temperature, "init_temperature")
        super().__init__(math.log(1 / init_temperature), gather, max_scale=max_scale)
        check_tiling(memory_efficient, tile)
        if not local and memory_efficient:
            raise ValueError("local=False scores the full matrix: it cannot be tiled")
        self.memory_efficient, self.tile, self.local = memory_efficient, tile, local

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return clip_loss(
            image,
            text,
            self.logit_scale[0],
            self.max_scale,
            self.gather,
            memory_efficient=self.memory_efficient,
            tile=self.tile,
            local=self.local,
        )
