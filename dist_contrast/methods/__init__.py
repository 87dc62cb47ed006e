"""Methods: batch -> embeddings -> loss. Built from the config by :func:`build_method`.

Each method lives in its own module, which exposes ``build(cfg) -> Method``.
"""

from __future__ import annotations

import importlib

from dist_contrast.config import Config
from dist_contrast.methods.base import LossOutput, Method
from dist_contrast.methods.simclr import SimCLR
from dist_contrast.models import build_encoder

# method.name -> module of dist_contrast.methods that builds it
MODULES = {
    "simclr": "simclr",
    "dcl": "simclr",
    "moco_v2": "moco",
    "moco_v3": "moco",
    "byol": "byol",
    "instdisc": "instdisc",
    "supcon": "supcon",
    "metric": "metric",
    "clip": "clip",
}


def build_encoder_from_config(cfg: Config):
    return build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)


def build_method(cfg: Config) -> Method:
    """The method of ``cfg``, with freshly initialised weights (seed them before calling)."""
    name = cfg.method.name
    if name not in MODULES:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(MODULES)}")
    module = importlib.import_module(f"dist_contrast.methods.{MODULES[name]}")
    return module.build(cfg)


__all__ = ["LossOutput", "Method", "SimCLR", "build_encoder_from_config", "build_method"]
