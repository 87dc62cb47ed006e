"""Towers built from a run config alone (the ``model``, ``text`` and ``data`` sections, read as
plain attributes): what training methods build and what an export loads, without the training
method around them.

- :func:`image_encoder`: the image encoder of ``model`` for ``data``'s channels and size;
- :func:`text_encoder`: the text transformer of ``text`` over a tokenizer's vocabulary;
- :func:`image_projection`, :func:`text_projection`: each tower's map to the joint space of
  image-text methods (``model.proj_dim``): linear without bias (CLIP), with a bias (SigLIP's
  text tower), none after a ``siglip``-layout ViT (SigLIP's attention-pooled feature is the
  joint space);
- :class:`Tower`: an encoder followed by its projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_contrast.errors import ConfigError
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


def _linear(in_dim: int, dim: int, bias: bool) -> nn.Linear:
    """CLIP's ``proj`` / ``text_projection`` init (OpenAI CLIP's ``model.py``, open_clip's):
    normal with std ``in_dim^-0.5``; a bias starts at zero (transformers' SigLIP text head)."""
    proj = nn.Linear(in_dim, dim, bias=bias)
    nn.init.normal_(proj.weight, std=in_dim**-0.5)
    if bias:
        nn.init.zeros_(proj.bias)
    return proj


def pools_to_joint_space(cfg: RunSpec) -> bool:
    """Whether the image encoder's feature is itself the joint space (a ``siglip``-layout ViT:
    SigLIP puts no projection after its attention pooling)."""
    return cfg.model.encoder.startswith("vit") and cfg.model.vit_layout == "siglip"


def image_projection(cfg: RunSpec, in_dim: int) -> nn.Module:
    """The image tower's map from an encoder of ``in_dim`` outputs to ``model.proj_dim``: a
    linear layer without bias, or nothing after a ``siglip``-layout ViT, whose width must then
    be ``model.proj_dim`` (a :class:`ConfigError` says so)."""
    dim = cfg.model.proj_dim
    if not pools_to_joint_space(cfg):
        return _linear(in_dim, dim, bias=False)
    if in_dim != dim:
        raise ConfigError(
            f"config key 'model.proj_dim' ({dim}) must equal the ViT width ({in_dim}) with "
            "model.vit_layout=siglip: SigLIP's pooled image feature is the joint space, with no "
            f"projection after it; set model.proj_dim={in_dim}"
        )
    return nn.Identity()


def text_projection(cfg: RunSpec, in_dim: int) -> nn.Linear:
    """The text tower's linear map to ``model.proj_dim``; with a bias for
    ``text.layout=siglip`` (transformers' ``SiglipTextModel.head``)."""
    return _linear(in_dim, cfg.model.proj_dim, bias=cfg.text.layout == "siglip")


class Tower(nn.Module):
    """An encoder followed by its projection ``proj`` to the joint embedding space of ``dim``
    (default: CLIP's, a linear layer without bias)."""

    def __init__(self, encoder: nn.Module, dim: int, proj: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.out_dim = encoder, dim
        self.proj = _linear(encoder.out_dim, dim, bias=False) if proj is None else proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(x))
