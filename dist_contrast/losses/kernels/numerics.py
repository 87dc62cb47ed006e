"""fp32 numerics shared by every objective and kernel: autocast off, upcasts, L2 normalisation,
masked log-sum-exp that stays finite."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def fp32_region() -> Iterator[None]:
    """Normalisation, log-sum-exp and masking run in fp32 whatever the autocast dtype
    (autocast off for CPU and, where present, CUDA; callers upcast their inputs)."""
    cuda = torch.autocast(device_type="cuda", enabled=False) if torch.cuda.is_available() else None
    with torch.autocast(device_type="cpu", enabled=False), cuda or contextlib.nullcontext():
        yield


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in at least fp32 (eps keeps all-zero rows finite)."""
    return F.normalize(upcast(x), dim=-1, eps=1e-8)


MASK_FILL = -1e30  # exp() of it is 0, but rows with nothing kept stay finite (no NaN grads)


def column_mask(rows: int, cols: int, index: torch.Tensor, value: bool) -> torch.Tensor:
    """A [rows, cols] bool mask, ``value`` at (i, index[i]) and ``not value`` elsewhere (what
    ``one_hot(...).bool()`` gives, without its int64 [rows, cols] intermediate)."""
    mask = torch.full((rows, cols), not value, dtype=torch.bool, device=index.device)
    mask[torch.arange(rows, device=index.device), index] = value
    return mask


def masked_logsumexp(logits: torch.Tensor, keep: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log-sum-exp over the kept entries. Rows with nothing kept give a huge negative finite
    value (never NaN, also not in the gradient): callers zero those rows out."""
    return torch.logsumexp(logits.masked_fill(~keep, MASK_FILL), dim=dim)
