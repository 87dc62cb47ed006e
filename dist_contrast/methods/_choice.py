"""The loss a method trains with: ``loss.name`` must be one that fits the method."""

from __future__ import annotations

from collections.abc import Sequence

from dist_contrast.config import Config
from dist_contrast.errors import ConfigError


class LossChoiceError(ConfigError, ValueError):
    """``loss.name`` does not fit ``method.name`` (a ValueError, printed as one line by the CLI)."""


def check_loss_name(cfg: Config, allowed: Sequence[str]) -> str:
    """``cfg.loss.name`` if ``method.name`` can train with it; else a one-line error."""
    name = cfg.loss.name
    if name not in allowed:
        choices = " or ".join(f"loss.name={a}" for a in allowed)
        raise LossChoiceError(
            f"method '{cfg.method.name}' does not train with loss.name={name!r}; set {choices}"
        )
    return name
