"""Optimizers: AdamW and SGD from torch, LARS and LAMB in plain torch (any device).

Biases and normalisation weights (every parameter with ``ndim <= 1``) get no weight decay, and
LARS and LAMB leave them out of the layer-wise trust ratio, as SimCLR and BYOL do. A parameter
whose ``grad`` is None is left untouched (no state update, no decay): the NaN guard of the
engine skips a step that way.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and kernels (decayed, layer-adapted), biases and norms (neither)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "adapt": True},
        {"params": no_decay, "weight_decay": 0.0, "adapt": False},
    ]


def _trust(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where both are positive, else 1 (a zero weight or update is not scaled)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(num))


class _LayerAdapted(torch.optim.Optimizer):
    """The step LARS and LAMB share: for each parameter with a gradient, the subclass's update
    direction ``u`` (weight decay included), scaled for groups with ``adapt`` by the trust
    ratio ``eta * ||w|| / ||u||`` (:func:`_trust`), then applied by the subclass."""

    eta_key = ""  # the group's key for eta, if it has one (else eta = 1)

    def _direction(self, p: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, p: torch.Tensor, u: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                u = self._direction(p, group, state)
                if group["adapt"]:
                    w_norm = p.norm() * group[self.eta_key] if self.eta_key else p.norm()
                    u.mul_(_trust(w_norm, u.norm()))
                self._apply(p, u, group, state)
        return loss


class LARS(_LayerAdapted):
    """LARS (You, Gitman, Ginsburg 2017) with momentum, in the form of SimCLR and BYOL:

    ``g = grad + wd * w``; ``t = eta * ||w|| / ||g||`` (1 for groups with ``adapt=False`` or a
    zero norm, as SimCLR's LARS); ``v = momentum * v + lr * t * g``; ``w = w - v``.
    """

    eta_key = "eta"

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS: lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0 "
                f"(got {lr}, {momentum}, {weight_decay}, {eta})"
            )
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta}
        super().__init__(params, {**defaults, "adapt": True})

    def _direction(self, p, group, state):
        return p.grad.add(p, alpha=group["weight_decay"])

    def _apply(self, p, u, group, state):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(u, alpha=group["lr"])
        p.sub_(buf)


class LAMB(_LayerAdapted):
    """LAMB (You et al. 2020): Adam's bias-corrected direction ``r = m_hat / (sqrt(v_hat) +
    eps)``, decoupled decay ``u = r + wd * w``, layer-wise ``w = w - lr * ||w|| / ||u|| * u``
    (trust 1 for groups with ``adapt=False`` or a zero norm)."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not all(0 <= b < 1 for b in betas) or eps <= 0 or weight_decay < 0:
            raise ValueError(
                f"LAMB: lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0 "
                f"(got {lr}, {betas}, {eps}, {weight_decay})"
            )
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "adapt": True})

    def _direction(self, p, group, state):
        b1, b2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
        return (m / (1 - b1**t)).div_(denom).add_(p, alpha=group["weight_decay"])

    def _apply(self, p, u, group, state):
        p.sub_(u, alpha=group["lr"])


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``model``'s trainable parameters: adamw, sgd (Nesterov momentum
    0.9), lars (momentum 0.9) or lamb."""
    groups = param_groups(model, train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.999))
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9, nesterov=True)
    if train.optimizer == "lars":
        return LARS(groups, lr=train.lr, momentum=0.9)
    if train.optimizer == "lamb":
        return LAMB(groups, lr=train.lr)
    raise ValueError(f"train.optimizer: unknown {train.optimizer!r}; choose adamw, sgd, lars, lamb")
