"""What writing and loading an export share: its layout, the error, strict weight checks, the
tokenizer a config names, and example inputs of a tower.

Layout of an export directory::

    export.json              towers, parameter counts, input specs, tokenizer, source run
    config.yaml              the run's resolved config (what rebuilds the networks)
    tokenizer.json           only for a BPE tokenizer
    README.md                a model card: training config and evaluation figures
    <tower>/model.safetensors   fp32 weights of each tower (image, text, heads)
    <tower>/model.pt         optional TorchScript (traced) of an encoder tower
    <tower>/model.onnx       optional ONNX of an encoder tower
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.errors import UserError
from dist_contrast.models.weights import load_exact

EXPORT_JSON = "export.json"
CONFIG_YAML = "config.yaml"
TOKENIZER_JSON = "tokenizer.json"
README_MD = "README.md"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.pt"
ONNX = "model.onnx"
FORMAT = "dist-contrast-export"
VERSION = 1
# Tower names whose module is an encoder with a forward; other towers are weights only.
IMAGE, TEXT = "image", "text"
ENCODER_TOWERS = (IMAGE, TEXT)


class ExportError(UserError):
    """A run that cannot be exported, or an export that cannot be loaded."""


def check_state(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module`` after checking it fits exactly: the first key whose
    shape differs (with both shapes), is missing, or is not expected is named in an
    :class:`ExportError` (``where`` says where the weights come from)."""
    load_exact(module, state, where, ExportError)


def tower_kind(name: str) -> str:
    """``image`` / ``text`` for encoder towers, ``weights`` for the rest (heads)."""
    return name if name in ENCODER_TOWERS else "weights"


def example_input(kind: str, cfg: Config, tokenizer=None, batch: int = 2) -> torch.Tensor:
    """A deterministic input of a tower: images [B, C, S, S] or token ids [B, L]."""
    gen = torch.Generator().manual_seed(0)
    if kind == IMAGE:
        size, ch = cfg.data.image_size, cfg.data.channels
        return torch.randn(batch, ch, size, size, generator=gen)
    texts = ["a photo of the digit 3", "a handwritten seven"][:batch]
    return tokenizer.encode(texts * (batch // len(texts) + 1))[:batch]
