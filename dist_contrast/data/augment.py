"""Two-view augmentation for small images, per sample, reproducible under a generator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dist_contrast.config import AugmentConfig


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels to roughly zero-mean inputs."""
    return (x - 0.5) / 0.5


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C, h, w] in [0, 1] -> normalised [C, size, size] (the evaluation transform)."""
    out = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return normalize_pixels(out.clamp(0, 1))


def random_view(
    img: torch.Tensor, size: int, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """One random view of ``img`` ([C, h, w], values in [0, 1]) at ``size`` x ``size``.

    A random resized crop (area fraction in [crop_scale_min, 1], aspect in [3/4, 4/3]) with a
    small rotation and shift, done as one affine resampling; then brightness, contrast and
    Gaussian noise."""
    area = _uniform(gen, cfg.crop_scale_min, 1.0)
    aspect = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
    sx = min(1.0, math.sqrt(area * aspect))
    sy = min(1.0, math.sqrt(area / aspect))
    # The crop centre stays inside the image; `translate` adds a shift beyond the crop slack.
    cx = _uniform(gen, -(1 - sx), 1 - sx) + _uniform(gen, -cfg.translate, cfg.translate)
    cy = _uniform(gen, -(1 - sy), 1 - sy) + _uniform(gen, -cfg.translate, cfg.translate)
    angle = math.radians(_uniform(gen, -cfg.rotation_deg, cfg.rotation_deg))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[sx * cos, -sy * sin, cx], [sx * sin, sy * cos, cy]], dtype=img.dtype)
    grid = F.affine_grid(theta[None], [1, img.shape[0], size, size], align_corners=False)
    out = F.grid_sample(
        img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    out = out * (1 + _uniform(gen, -cfg.brightness, cfg.brightness))
    mean = out.mean()
    out = (out - mean) * (1 + _uniform(gen, -cfg.contrast, cfg.contrast)) + mean
    if cfg.noise_std > 0:
        out = out + cfg.noise_std * torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return normalize_pixels(out.clamp(0, 1))
