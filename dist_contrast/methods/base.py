"""What the engine knows of a method: ``method(batch) -> LossOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """A training objective around encoders. Subclasses set ``encoder`` (the network whose
    representation is evaluated and exported) and implement
    ``forward(batch) -> LossOutput``."""

    encoder: nn.Module

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        """Negatives each query is scored against, for a per-rank batch of ``batch_size``."""
        return 0
