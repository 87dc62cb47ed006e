"""Methods: batch -> embeddings -> loss. Built from the config by :func:`build_method`.

Each method lives in its own module, which exposes ``build(cfg) -> Method``; the registry
(:mod:`dist_contrast.methods.registry`) maps ``method.name`` to it and says which losses and
sample fields it needs.
"""

from __future__ import annotations

from dist_contrast.methods.base import LossOutput, Method
from dist_contrast.methods.registry import METHODS, build_method

__all__ = ["METHODS", "LossOutput", "Method", "build_method"]
