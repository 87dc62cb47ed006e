"""Encoders and heads. Model code knows nothing of ranks or DeepSpeed.

Encoders (``model.encoder``): ``resnet_tiny`` / ``resnet_small`` (small digits/CIFAR ResNets),
``resnet18`` / ``resnet50`` (He et al. 2016; ``model.width`` channels in the first stage,
``model.stem`` imagenet or small), ``vit_nano`` / ``vit_tiny`` / ``vit_small`` / ``vit_base``
(Dosovitskiy et al. 2021; ``model.patch_size``, ``model.vit_layout`` timm, clip or siglip, the
preset's size overridden by ``model.vit_width`` / ``vit_depth`` / ``vit_heads`` /
``vit_mlp_ratio``;
LayerNorm, so ``model.norm`` and ``model.width`` do not apply).
Every encoder maps images to a ``(batch, out_dim)`` representation and exposes ``out_dim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dist_contrast.models.heads import MLPHead
from dist_contrast.models.layers import check_norm
from dist_contrast.models.resnet import BasicBlock, Bottleneck, ResNet, SmallResNet
from dist_contrast.models.text import TextTransformer
from dist_contrast.models.vit import VIT_SIZES, Block, VisionTransformer, vit_size

# ``model`` below is the ``model`` section of a run config (any object with its fields): models
# import nothing of the package outside models/ and errors.
ModelSpec = Any
Builder = Callable[[ModelSpec, int, int], nn.Module]


def _small(blocks: tuple[int, ...]) -> Builder:
    def build(m: ModelSpec, in_channels: int, image_size: int) -> nn.Module:
        check_norm(m.norm)
        return SmallResNet(in_channels, m.width, blocks, m.norm, m.activation_checkpointing)

    return build


def _resnet(block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...]) -> Builder:
    def build(m: ModelSpec, in_channels: int, image_size: int) -> nn.Module:
        check_norm(m.norm)
        return ResNet(
            in_channels, m.width, block, layers, m.stem, m.norm, m.activation_checkpointing
        )

    return build


def _vit(name: str) -> Builder:
    def build(m: ModelSpec, in_channels: int, image_size: int) -> nn.Module:
        return VisionTransformer(
            in_channels,
            image_size,
            m.patch_size,
            vit_size(name, m.vit_width, m.vit_depth, m.vit_heads, m.vit_mlp_ratio),
            m.activation_checkpointing,
            m.vit_layout,
            m.activation,
            m.norm_eps,
        )

    return build


ENCODERS: dict[str, Builder] = {
    "resnet_tiny": _small((1, 1, 1)),
    "resnet_small": _small((2, 2, 2)),
    "resnet18": _resnet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": _resnet(Bottleneck, (3, 4, 6, 3)),
    **{name: _vit(name) for name in VIT_SIZES},
}


def build_encoder(model: ModelSpec, in_channels: int, image_size: int) -> nn.Module:
    """The encoder ``model.encoder``; it exposes ``out_dim``, the width of its representation."""
    if model.encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {model.encoder!r}; choose one of {sorted(ENCODERS)}")
    if model.width < 1:
        raise ValueError(f"model.width must be >= 1, got {model.width}")
    return ENCODERS[model.encoder](model, in_channels, image_size)


def build_head(in_dim: int, model: ModelSpec, out_dim: int | None = None) -> MLPHead:
    """The projector of ``model``: ``in_dim`` -> ``out_dim`` (default ``model.proj_dim``)."""
    return MLPHead(
        in_dim,
        model.proj_hidden_dim,
        out_dim or model.proj_dim,
        model.proj_layers,
        model.proj_norm,
    )


def build_predictor(model: ModelSpec) -> MLPHead:
    """The predictor of BYOL / MoCo v3: ``proj_dim`` -> ``pred_hidden_dim`` -> ``proj_dim``."""
    return MLPHead(model.proj_dim, model.pred_hidden_dim, model.proj_dim, 2, model.proj_norm)


def build_text_encoder(
    text: Any,
    vocab_size: int,
    context_length: int,
    eot_id: int,
    checkpointing: bool,
    act: str = "gelu",
    eps: float = 1e-6,
) -> TextTransformer:
    """The text tower of ``text`` (``text.layout`` clip or siglip) over a tokenizer's
    vocabulary; exposes ``out_dim``."""
    return TextTransformer(
        vocab_size,
        context_length,
        eot_id,
        text.width,
        text.layers,
        text.heads,
        text.mlp_ratio,
        checkpointing,
        act,
        eps,
        text.layout,
    )


# The units :func:`dist_contrast.models.layers.run_blocks` runs (and checkpoints) one by one:
# what ``train.compile`` compiles.
BLOCKS = (Block, BasicBlock, Bottleneck)


def compile_blocks(root: nn.Module) -> int:
    """``torch.compile`` each block of the encoders in ``root`` (momentum twins included), in
    place (:meth:`torch.nn.Module.compile`): parameter names, state dicts and copies are those
    of the eager modules. Activation checkpointing stays outside, around each compiled block,
    so its batch-norm context is never traced. Returns the number of blocks compiled.

    Static shapes (``dynamic=False``): a block is compiled once per shape, training or
    evaluation mode and grad mode; blocks alike share one compiled graph (the parameters are
    inputs of it). Dynamo's per-code recompile limit is raised to 4 x the number of blocks (a
    graph per block shape, train/eval mode and grad mode, shared with the momentum twins') so
    that none falls back to eager for want of a cache entry."""
    blocks = [m for m in root.modules() if isinstance(m, BLOCKS)]
    for block in blocks:
        block.compile(dynamic=False)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len(blocks))
    return len(blocks)


__all__ = [
    "ENCODERS",
    "MLPHead",
    "ResNet",
    "SmallResNet",
    "VisionTransformer",
    "build_encoder",
    "build_head",
    "build_predictor",
    "build_text_encoder",
    "compile_blocks",
    "vit_size",
]
