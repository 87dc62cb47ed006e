"""Input checks and fp32 helpers shared by every objective."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dist_contrast import distributed


def fp32_region() -> contextlib.AbstractContextManager:
    """Normalisation, log-sum-exp and masking run in fp32 whatever the autocast dtype."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=dev, enabled=False)


def check_embeddings(x: torch.Tensor, name: str, ndim: int = 2) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        want = "[N, D]" if ndim == 2 else "[N, V, D]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_temperature(t: float | torch.Tensor) -> None:
    value = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")


def check_gather(mode: str) -> bool:
    if mode not in ("all", "off"):
        raise ValueError(f"gather must be 'all' or 'off', got {mode!r}")
    return mode == "all"


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in at least fp32 (eps keeps all-zero rows finite)."""
    return F.normalize(upcast(x), dim=-1, eps=1e-8)


def gather(x: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, int]:
    """Rows of every rank (with gradient) and this rank's offset, or the local rows."""
    if not enabled:
        return x, 0
    return distributed.all_gather_with_offset(x)
