"""What the sharded buffers (ShardedQueue, MemoryBank) share: argument and layout checks,
initial rows that do not depend on how many ranks share them, dtype-keeping moves, checks of
the states ranks saved."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_contrast import distributed

BLOCK = 1024  # global rows drawn from one generator


def check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def world_rank(world: int | None, rank: int | None) -> tuple[int, int]:
    """``(world, rank)``: the given ones, checked, or those of the running process group."""
    world = distributed.world_size() if world is None else check_int(world, "world", 1)
    rank = distributed.rank() if rank is None else check_int(rank, "rank", 0)
    if rank >= world:
        raise ValueError(f"rank must be < world ({world}), got {rank}")
    return world, rank


def unit_rows(rows: torch.Tensor, dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random unit vectors [len(rows), dim] for the given global row indices.

    Global row ``i`` is row ``i % BLOCK`` of ``randn(BLOCK, dim)`` drawn from a generator seeded
    with ``(seed, i // BLOCK)``, so a row's initial value depends on the seed and its global
    index only: the shards of W ranks put together are the buffer of one process, whatever W.
    Each rank draws only the blocks that hold its rows."""
    rows = rows.to(torch.int64).cpu()
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("unit_rows needs strictly increasing row indices")
    parts = []
    blocks, counts = torch.unique_consecutive(rows // BLOCK, return_counts=True)
    for block, chunk in zip(blocks.tolist(), rows.split(counts.tolist()), strict=True):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63))
        parts.append(torch.randn(BLOCK, dim, generator=gen)[chunk % BLOCK])
    out = torch.cat(parts) if parts else torch.empty(0, dim)
    return F.normalize(out.to(dtype), dim=1)


def move_buffers(module: torch.nn.Module, fn) -> torch.nn.Module:
    """``Module._apply`` for the sharded buffers: they follow the device ``fn`` moves to but
    keep their dtype, so ``.half()``, ``.bfloat16()`` or ``.to(dtype)`` of an enclosing model
    (DeepSpeed's fp16/bf16 modes cast the module) leave the stored rows in fp32."""
    for name, buf in module._buffers.items():
        if buf is not None:
            module._buffers[name] = buf.to(fn(buf.new_empty(0)).device)
    return module


def check_shard_state(
    state: dict, want: dict, rows: str, current: torch.Tensor, what: str, this: str
) -> torch.Tensor:
    """``state[rows]``, once ``state`` (what a ``shard_state_dict`` returned) is known to have
    the layout ``want`` and rows of the shape of ``current``; a clear error otherwise."""
    got = {key: state.get(key) for key in want}
    if got != want:
        raise ValueError(f"{what} shard state is for {got}, {this} is {want}")
    stored = state[rows]
    if tuple(stored.shape) != tuple(current.shape):
        raise ValueError(
            f"{what} shard state has {rows} {tuple(stored.shape)}, expected {tuple(current.shape)}"
        )
    return stored


def check_saved_world(states: list[dict], what: str) -> int:
    """The number of ranks that saved ``states`` (every old rank's ``shard_state_dict``, in rank
    order), once each names that number and its own place; a clear error otherwise."""
    if not states:
        raise ValueError(f"no {what} shard states to load")
    for i, state in enumerate(states):
        got = (state.get("world"), state.get("rank"))
        if got != (len(states), i):
            raise ValueError(
                f"{what} shard state {i} is rank {got[1]} of {got[0]}, not rank {i} of "
                f"{len(states)}: pass the states saved by {got[0]} rank(s), in rank order"
            )
    return len(states)
