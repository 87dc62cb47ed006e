"""Momentum (EMA) encoders: ``target <- m * target + (1 - m) * online`` after each step, and
:class:`MomentumMethod`, the online networks with their momentum twin (MoCo v2/v3, BYOL).

Correct under every ZeRO stage. Under ZeRO-3 parameters are partitioned: each rank holds a flat
slice (``ds_tensor``) of every parameter, and an online parameter and its momentum twin have the
same size, hence the same partitioning, so each rank updates its own slices with no
communication and no full copy of either network. Under ZeRO 0-2 parameters are whole.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.methods.base import Method, agreed
from dist_contrast.models import build_encoder, build_head


def momentum_at(step: int, total: int, base: float, final: float = 1.0) -> float:
    """Cosine schedule from ``base`` at step 0 to ``final`` at ``total`` (BYOL, MoCo v3)."""
    if total <= 0:
        return base
    progress = min(1.0, max(0.0, step / total))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def scheduled_momentum(
    step: int, total: int, base: float, final: float = 1.0, schedule: str = "constant"
) -> float:
    """The momentum of the EMA update after the ``step``-th optimizer step (1-based):
    ``base`` throughout ("constant"), or :func:`momentum_at` ("cosine")."""
    return base if schedule == "constant" else momentum_at(step - 1, total, base, final)


def _ema(t: torch.Tensor, o: torch.Tensor, momentum: float) -> None:
    if t.shape != o.shape:
        raise ValueError(f"momentum twin has another shape: {tuple(t.shape)} vs {tuple(o.shape)}")
    t.mul_(momentum).add_(o.to(t.dtype), alpha=1.0 - momentum)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """One EMA step of ``target`` towards ``online`` (same architecture); buffers (batch-norm
    statistics) are copied."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        if not hasattr(t, "ds_tensor"):  # ZeRO 0-2: whole parameters
            _ema(t.data, o.data, momentum)
            continue
        _ema(t.ds_tensor, o.ds_tensor, momentum)  # ZeRO-3: this rank's partition
        # Small parameters stay whole on every rank as well (ZeRO-3 "persistence"):
        # the whole copy is what the forward pass reads, so it is updated too.
        if t.data.numel() == t.ds_numel and o.data.numel() == o.ds_numel:
            _ema(t.data, o.data, momentum)
    for bt, bo in zip(target.buffers(), online.buffers(), strict=True):
        bt.copy_(bo)


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be the momentum encoder (built before DeepSpeed wraps the
    method, so that ZeRO-3 partitions both alike)."""
    import copy

    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class MomentumMethod(Method):
    """Online ``encoder`` -> ``projector`` (-> ``predictor``) and a momentum twin of encoder and
    projector, updated after each step with momentum ``m(step)``: constant ``momentum`` or a
    cosine from ``momentum`` to ``momentum_final`` over the run (``schedule="cosine"``)."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        predictor: nn.Module | None,
        *,
        momentum: float,
        momentum_final: float = 1.0,
        schedule: str = "constant",
    ) -> None:
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"momentum schedule must be 'constant' or 'cosine', got {schedule!r}")
        for value, name in ((momentum, "momentum"), (momentum_final, "momentum_final")):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.target_encoder = make_target(encoder)
        self.target_projector = make_target(projector)
        self.momentum, self.momentum_final, self.schedule = momentum, momentum_final, schedule
        self.step = 0  # optimizer steps taken, as the engine counts them

    def online(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.encoder(x))
        return z if self.predictor is None else self.predictor(z)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_encoder(x))

    @abc.abstractmethod
    def embed_online(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The embeddings with gradient (the surrogate pass of cached accumulation needs only
        these: the twin's outputs carry no gradient)."""

    def momentum_at(self, step: int, total: int) -> float:
        """The momentum of the update after the ``step``-th step (1-based)."""
        return scheduled_momentum(step, total, self.momentum, self.momentum_final, self.schedule)

    def sync_targets(self) -> None:
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_projector.load_state_dict(self.projector.state_dict())

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = self.momentum_at(step, total_steps)
        ema_update(self.target_encoder, self.encoder, m)
        ema_update(self.target_projector, self.projector, m)
        self.step = step

    def extra_state(self) -> dict:
        return {"step": self.step}

    def load_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def load_extra_state_elastic(self, states: list[dict]) -> list[str]:
        self.step = int(agreed(states, "step"))
        return []


def momentum_kwargs(cfg: Config) -> dict:
    m = cfg.method
    return {
        "momentum": m.momentum,
        "momentum_final": m.momentum_final,
        "schedule": m.momentum_schedule,
    }


def online_networks(cfg: Config) -> tuple[nn.Module, nn.Module]:
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    return encoder, build_head(encoder.out_dim, cfg.model)
