"""Input checks shared by the objectives: shapes, dtypes, labels and hyperparameters.

Shapes and dtypes are checked on every call (they cost nothing); values only where they are
Python numbers (hyperparameters). The values of tensors (embeddings, a learned temperature or
logit scale) are never read here: reading one is a host sync on a GPU, and a NaN on one rank
must not raise on that rank alone while the others wait in a collective. A non-finite input
gives a non-finite loss, which the step guard (``train/guard.py``) turns into a skipped step on
every rank."""

from __future__ import annotations

import torch


def check_embeddings(x: torch.Tensor, name: str, ndim: int = 2) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        want = "[N, D]" if ndim == 2 else "[N, V, D]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has embedding dimension 0")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_temperature(t: float | torch.Tensor) -> None:
    if _scalar_tensor(t, "temperature"):
        return
    if not float(t) > 0:
        raise ValueError(f"temperature must be > 0, got {float(t)}")


def check_gather(mode: str) -> bool:
    if mode not in ("all", "off"):
        raise ValueError(f"gather must be 'all' or 'off', got {mode!r}")
    return mode == "all"


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


def _scalar_tensor(value: float | torch.Tensor, name: str) -> bool:
    """Whether ``value`` is a tensor (then one element, its value left unread)."""
    if not isinstance(value, torch.Tensor):
        return False
    if value.numel() != 1:
        raise ValueError(f"{name} must be a single value, got shape {tuple(value.shape)}")
    return True


def check_finite(value: float | torch.Tensor, name: str) -> float | None:
    """``value`` as a float once it is finite; None for a tensor (its value is not read)."""
    if _scalar_tensor(value, name):
        return None
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_positive(value: float | torch.Tensor, name: str) -> float | None:
    v = check_finite(value, name)
    if v is not None and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_tiling(memory_efficient: bool, tile: int | None) -> None:
    if not isinstance(memory_efficient, bool):
        raise ValueError(f"memory_efficient must be True or False, got {memory_efficient!r}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be a positive integer or None, got {tile!r}")
