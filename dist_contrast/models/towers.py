"""Towers built from a run config alone (the ``model``, ``text`` and ``data`` sections, read as
plain attributes): what training methods build and what an export loads, without the training
method around them.

- :func:`image_encoder`: the image encoder of ``model`` for ``data``'s channels and size;
- :func:`text_encoder`: the causal text transformer of ``text`` over a tokenizer's vocabulary;
- :class:`Tower`: an encoder followed by a linear projection (no bias) to the joint space of
  image-text methods.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_contrast.models import build_encoder, build_text_encoder
from dist_contrast.models.text import TextTransformer

RunSpec = Any  # a run config (dist_contrast.config.Config) or any object with its sections


def image_encoder(cfg: RunSpec) -> nn.Module:
    """The image encoder of ``cfg.model`` for images of ``cfg.data``'s channels and size."""
    return build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)


def text_encoder(cfg: RunSpec, vocab_size: int, eot_id: int) -> TextTransformer:
    """The text tower of ``cfg.text`` over a vocabulary of ``vocab_size`` ids, pooled at the
    first ``eot_id``, for rows of ``cfg.data.context_length`` ids."""
    m = cfg.model
    return build_text_encoder(
        cfg.text,
        vocab_size,
        cfg.data.context_length,
        eot_id,
        m.activation_checkpointing,
        m.activation,
        m.norm_eps,
    )


class Tower(nn.Module):
    """An encoder followed by a linear projection to the joint embedding space, initialised
    normal with std ``out_dim^-0.5``: CLIP's ``proj`` (image) and ``text_projection`` (OpenAI
    CLIP's ``model.py``, open_clip's)."""

    def __init__(self, encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.out_dim, dim, bias=False)
        nn.init.normal_(self.proj.weight, std=encoder.out_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(x))
