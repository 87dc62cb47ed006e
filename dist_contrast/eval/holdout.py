"""A set that is both the probes' training data and their queries: a fixed fraction of its
samples held out, chosen by a permutation seeded 0 of the samples in the set's order (the same
samples whatever the number of ranks), after the set was embedded once as a stream.

Each rank keeps the rows it embedded: those held out are gathered on every rank (the queries,
as a validation set is), the others stay this rank's shard of the bank, copied a block at a
time into the bank's own storage (in memory up to ``eval.bank_memory_mb``, then on disk)."""

from __future__ import annotations

import torch

from dist_contrast import distributed
from dist_contrast.config import EvalConfig
from dist_contrast.errors import DataError
from dist_contrast.eval.memory import DiskRows, Rows
from dist_contrast.eval.stream import Embedded

SELECT_BLOCK_BYTES = 8 << 20  # rows read at a time while a part of a set is copied out


def held_out_positions(order: torch.Tensor, fraction: float, name: str) -> torch.Tensor:
    """The global positions (:data:`~dist_contrast.eval.stream.UNIT_STRIDE`) of the held-out
    samples of a set whose rows on this rank are at ``order``: the first
    ``max(1, round(fraction * n))`` of a permutation (seeded 0) of the set's ``n`` samples."""
    every = distributed.all_gather_no_grad(order.to(distributed.device())).cpu()
    n = len(every)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 1:
        raise DataError(f"{name} holds {n} sample(s): too few to hold out a split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return every.sort().values[perm[:n_val]]


def in_memory(x: torch.Tensor | DiskRows) -> torch.Tensor:
    """Rows as one tensor (features read back from disk, or the tensor itself)."""
    return x[0 : len(x)] if isinstance(x, DiskRows) else x


def select_rows(
    x: torch.Tensor | DiskRows, keep: torch.Tensor, memory_bytes: int | None, spill_dir: str
) -> torch.Tensor | DiskRows:
    """The rows of ``x`` where ``keep``, in order, read a block at a time into a
    :class:`~dist_contrast.eval.memory.Rows` of that budget (None: all in memory)."""
    width = x.row_bytes if isinstance(x, DiskRows) else x[0:1].nbytes
    step = max(1, SELECT_BLOCK_BYTES // max(1, width))
    rows = Rows(memory_bytes, spill_dir)
    for i in range(0, len(x), step):
        part = x[i : i + step][keep[i : i + step]]
        if len(part):
            rows.append(part)
    return rows.join() if len(rows) else x[0:0].clone()


def _part(e: Embedded, keep: torch.Tensor, memory_bytes: int | None, spill_dir: str) -> Embedded:
    feats = {k: select_rows(v, keep, memory_bytes, spill_dir) for k, v in e.feats.items()}
    captions = [c for c, k in zip(e.captions, keep.tolist(), strict=True) if k]
    return Embedded(feats, e.labels[keep], captions, e.order[keep])


def hold_out(
    train: Embedded, fraction: float, name: str, ev: EvalConfig
) -> tuple[Embedded, Embedded]:
    """(bank, queries) of the embedded set ``train`` (this rank's rows): the bank this rank's
    rows not held out (:func:`held_out_positions`), in the bank's storage
    (``eval.bank_memory_mb``, ``eval.spill_dir``); the queries every held-out row, gathered."""
    held = torch.isin(train.order, held_out_positions(train.order, fraction, name))
    queries = _part(train, held, None, "").gathered()
    budget = int(ev.bank_memory_mb * (1 << 20))
    bank = _part(train, ~held, budget, ev.spill_dir)
    return bank, queries
