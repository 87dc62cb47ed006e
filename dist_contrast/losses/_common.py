"""Input checks and fp32 helpers shared by every objective."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dist_contrast import distributed


@contextlib.contextmanager
def fp32_region() -> Iterator[None]:
    """Normalisation, log-sum-exp and masking run in fp32 whatever the autocast dtype
    (autocast off for CPU and, where present, CUDA; callers upcast their inputs)."""
    cuda = torch.autocast(device_type="cuda", enabled=False) if torch.cuda.is_available() else None
    with torch.autocast(device_type="cpu", enabled=False), cuda or contextlib.nullcontext():
        yield


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


# --------------------------------------------------------------------------------------------
# More input checks

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_rows(x: torch.Tensor, name: str) -> None:
    """A non-empty floating-point batch (after :func:`check_embeddings`)."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows)")


def check_input(x: torch.Tensor, name: str, ndim: int = 2) -> None:
    """Shape, dtype, non-empty and finite: everything an embedding batch must be."""
    check_embeddings(x, name, ndim)
    check_rows(x, name)


def check_input_pair(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    """:func:`check_input` for both batches, and the same shape."""
    check_input(a, na)
    check_input(b, nb)
    check_same_shape(a, b, na, nb)


def check_labels(labels: torch.Tensor, n: int, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(labels.shape)}")
    if labels.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the batch has {n} rows")


def check_finite(value: float | torch.Tensor, name: str) -> float:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_positive(value: float | torch.Tensor, name: str) -> float:
    v = check_finite(value, name)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Distributed reductions


def world(enabled: bool) -> int:
    """Ranks whose anchors make up the global batch: W with the gather on, 1 without."""
    return distributed.world_size() if enabled else 1


def all_reduce_sum(t: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over ranks, e.g. a count of non-zero losses."""
    t = t.detach()
    if enabled and distributed.is_dist() and distributed.world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def gather_labels(labels: torch.Tensor, enabled: bool) -> torch.Tensor:
    return distributed.all_gather_no_grad(labels) if enabled else labels


def global_mean(local_sum: torch.Tensor, n_global: int | torch.Tensor, enabled: bool):
    """This rank's share of a mean over the anchors of every rank.

    Returns ``W * local_sum / n_global``: the mean over ranks of these values is the global
    mean, and because the gather's backward sums the gradient over ranks, the gradient of each
    rank divided by W (DeepSpeed's average) is that of the global mean. With equal per-rank
    batches and ``n_global = W * n_local`` this is the mean over the local anchors."""
    if isinstance(n_global, torch.Tensor):
        n_global = n_global.clamp(min=1).to(local_sum.dtype)
    else:
        n_global = max(int(n_global), 1)
    return local_sum * world(enabled) / n_global


def keep_graph(loss: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Tie ``tensors`` (gathered ones) into ``loss`` with weight 0.

    Every rank must run the backward of every gather, or the ranks that do wait forever for
    the others in the backward all-reduce; a loss that happens not to use a gathered tensor on
    one rank (no pairs, no owned anchors) still reaches it through this zero term."""
    for t in tensors:
        if t.requires_grad:
            loss = loss + t.sum() * 0
    return loss


_MASK_FILL = -1e30  # exp() of it is 0, but rows with nothing kept stay finite (no NaN grads)


def column_mask(rows: int, cols: int, index: torch.Tensor, value: bool) -> torch.Tensor:
    """A [rows, cols] bool mask, ``value`` at (i, index[i]) and ``not value`` elsewhere (what
    ``one_hot(...).bool()`` gives, without its int64 [rows, cols] intermediate)."""
    mask = torch.full((rows, cols), not value, dtype=torch.bool, device=index.device)
    mask[torch.arange(rows, device=index.device), index] = value
    return mask


def masked_logsumexp(logits: torch.Tensor, keep: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log-sum-exp over the kept entries. Rows with nothing kept give a huge negative finite
    value (never NaN, also not in the gradient): callers zero those rows out."""
    return torch.logsumexp(logits.masked_fill(~keep, _MASK_FILL), dim=dim)


# --------------------------------------------------------------------------------------------
# The memory-efficient (tiled) softmax


def check_tiling(memory_efficient: bool, tile: int | None) -> None:
    if not isinstance(memory_efficient, bool):
        raise ValueError(f"memory_efficient must be True or False, got {memory_efficient!r}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be a positive integer or None, got {tile!r}")


def tiled_cross_entropy(*args, tile: int | None = None, **kwargs) -> torch.Tensor:
    """:func:`dist_contrast.negatives.tiled.tiled_cross_entropy` (``tile=None``: its default),
    imported on first use: the negatives package may import the losses."""
    from dist_contrast.negatives import tiled

    if tile is not None:
        kwargs["tile"] = tile
    return tiled.tiled_cross_entropy(*args, **kwargs)


def tiled_logsumexp(
    anchors, columns, exclude=None, tile: int | None = None, *, scale=1.0
) -> torch.Tensor:
    """:func:`dist_contrast.negatives.tiled.tiled_logsumexp`, imported on first use."""
    from dist_contrast.negatives import tiled

    return tiled.tiled_logsumexp(anchors, columns, exclude, tile or tiled.DEFAULT_TILE, scale=scale)
