"""ResNets: the small digits/CIFAR variants and ResNet-18/50 (He et al. 2016). No distributed code.

Conventions: ``width`` is the channel count of the first stage (64 in the paper); stage ``i``
has ``width * 2**i`` channels before the bottleneck expansion; the first block of every stage
after the first downsamples by 2 (in the 3x3 convolution of a bottleneck, "ResNet v1.5", as in
most ImageNet recipes). The representation is the global average pool of the last stage, with
no classifier; ``out_dim`` is its width.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.models.layers import make_norm, run_blocks

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "SmallResNet", "make_norm"]


def _shortcut(c_in: int, c_out: int, stride: int, norm: str, groups: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride, bias=False), make_norm(norm, c_out, groups)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, c_out, groups)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride, norm, groups)

    @property
    def last_norm(self) -> nn.Module:
        return self.norm2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce to ``mid``, 3x3 (carrying the stride), 1x1 expand to ``4 * mid``."""

    expansion = 4

    def __init__(self, c_in: int, mid: int, stride: int, norm: str, groups: int = 8) -> None:
        super().__init__()
        c_out = mid * self.expansion
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.norm1 = make_norm(norm, mid, groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.norm2 = make_norm(norm, mid, groups)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.norm3 = make_norm(norm, c_out, groups)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride, norm, groups)

    @property
    def last_norm(self) -> nn.Module:
        return self.norm3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """3x3 stem (no max-pool, for small images), stages of basic blocks, global average pool.

    ``blocks=(1, 1, 1)`` with widths (w, 2w, 4w) is ``resnet_tiny``; ``(2, 2, 2)`` is
    ``resnet_small``. The output is the ``out_dim``-wide representation used downstream.
    PyTorch's default initialisation, group norm with up to 8 groups."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        blocks: tuple[int, ...],
        norm: str,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            make_norm(norm, width),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1, norm))
                c = c_out
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.stages, self.stem(x), self.checkpointing and self.training)
        return self.pool(x).flatten(1)


def _stem(kind: str, in_channels: int, width: int, norm: str) -> nn.Sequential:
    if kind == "imagenet":  # 7x7 stride-2 convolution, then 3x3 stride-2 max-pool: 1/4 size
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
            make_norm(norm, width, 32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    if kind == "small":  # 3x3 stride-1 convolution, no pooling (CIFAR, digits)
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            make_norm(norm, width, 32),
            nn.ReLU(inplace=True),
        )
    raise ValueError(f"unknown model.stem {kind!r}; choose imagenet or small")


class ResNet(nn.Module):
    """ResNet of He et al. 2016 ("Deep Residual Learning for Image Recognition") without the
    classifier: ``BasicBlock, (2, 2, 2, 2)`` is ResNet-18, ``Bottleneck, (3, 4, 6, 3)`` is
    ResNet-50 (``out_dim`` = 8 * width * expansion: 512 and 2048 at width 64).

    Stem ``imagenet``: 7x7/2 convolution + 3x3/2 max-pool; ``small``: one 3x3/1 convolution
    (CIFAR-style, for 32 px and smaller). Convolutions take He (fan-out) initialisation; the
    last norm of every residual block starts at zero scale, so each block starts as the
    identity (Goyal et al. 2017). Group norm uses up to 32 groups (Wu & He 2018)."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        stem: str = "imagenet",
        norm: str = "batch",
        checkpointing: bool = False,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.stem = _stem(stem, in_channels, width, norm)
        blocks: list[nn.Module] = []
        c = width
        for i, n in enumerate(layers):
            mid = width * 2**i
            for j in range(n):
                blocks.append(block(c, mid, 2 if (i > 0 and j == 0) else 1, norm, 32))
                c = mid * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c
        self.checkpointing = checkpointing
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for b in self.blocks:
                norm = b.last_norm
                if getattr(norm, "weight", None) is not None:
                    nn.init.zeros_(norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, self.stem(x), self.checkpointing and self.training)
        return self.pool(x).flatten(1)
