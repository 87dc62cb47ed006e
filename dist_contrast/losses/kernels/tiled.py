"""Tiled softmax: cross-entropy over many columns without the [rows, columns] logits.

The softmax losses score R anchors against N columns (the gathered batch, a queue). Done whole,
the [R, N] logits, their softmax and their gradient each take ``4 R N`` bytes in fp32: 24 GiB per
rank at a global batch of 65,536 on 2 ranks. Here the logits exist one block of
``tile x tile`` at a time:

- forward keeps, per anchor row, a running log-sum-exp over the column tiles (the only thing
  saved besides the inputs is that [R] vector);
- backward recomputes each block's logits, turns them into ``grad * softmax`` and accumulates
  the anchors' and the columns' gradients block by block.

Masks never exist whole either: a column excluded from a row's softmax (the anchor itself,
NT-Xent's and SupCon's self view) is one index per row, applied inside each block; positives
are a target index per row or labels per row and per column. The positive logits are linear in
the embeddings, so they are computed from [R, D] and [classes, D] sums, not from the logits.

Numerics: the log-sum-exp runs in the inputs' dtype, at least fp32 (fp16/bf16 are upcast), with
autocast off. An excluded entry is filled with -1e30 rather than -inf, as
``dist_contrast.losses.kernels.numerics.masked_logsumexp`` does: a row with nothing kept stays
finite.

Distributed: ``columns`` are what the caller gathered with
``dist_contrast.losses.reduce.gather`` (``dist_contrast.distributed.all_gather_with_offset``);
the column gradient computed here flows into that gather's exact backward (sum over ranks, keep
this rank's rows), so W ranks equal one process on the global batch exactly as for the
full-matrix losses.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from dist_contrast.losses.kernels.numerics import MASK_FILL, fp32_region, upcast

DEFAULT_TILE = 1024


def _check_tile(tile: int) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return tile


def _fill_excluded(s: torch.Tensor, exclude: torch.Tensor | None, c0: int, value: float) -> None:
    """Set ``s[r, exclude[r] - c0] = value`` in place where that column lies in this block
    (no host sync: rows whose excluded column is elsewhere write back their own value)."""
    if exclude is None:
        return
    hit, idx = _in_block(exclude, c0, s.shape[1])
    keep = s.gather(1, idx)
    s.scatter_(1, idx, torch.where(hit, torch.full_like(keep, value), keep))


def _in_block(index: torch.Tensor, c0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([r, 1] bool: index[r] is in columns [c0, c0 + width), [r, 1] its clamped local index)."""
    local = index - c0
    hit = (local >= 0) & (local < width)
    return hit[:, None], local.clamp(0, width - 1)[:, None]


def _blocks(n: int, tile: int) -> Iterator[slice]:
    for start in range(0, n, tile):
        yield slice(start, min(start + tile, n))


class TiledCrossEntropy(torch.autograd.Function):
    """Per anchor row r, ``lse_r - s[r, targets[r]]`` (or ``lse_r`` without targets), where
    ``s = scale * anchors @ columns.T`` and ``lse_r`` is the log-sum-exp of row r of ``s``
    over every column but ``exclude[r]``; computed block by block.

    Inputs: ``anchors`` [R, D], ``columns`` [N, D] of the same dtype, ``scale`` a 0-dim tensor
    of that dtype (1/T, or CLIP's exp(logit_scale)), ``targets`` and ``exclude`` [R] int64 or
    None (-1 in ``exclude``: nothing left out), ``tile``: rows and columns per block. Forward
    keeps a running log-sum-exp per row and saves the inputs and the [R] log-sum-exp, never an
    [R, N] tensor; backward recomputes each block's logits. Gradients: anchors, columns, scale.
    """

    @staticmethod
    def forward(ctx, anchors, columns, scale, targets, exclude, tile):
        lse = torch.empty(anchors.shape[0], dtype=anchors.dtype, device=anchors.device)
        picked = torch.zeros_like(lse)  # the target logit of each row
        for rows in _blocks(anchors.shape[0], tile):
            a = anchors[rows] * scale
            ex = None if exclude is None else exclude[rows]
            running = torch.full_like(lse[rows], float("-inf"))
            for cols in _blocks(columns.shape[0], tile):
                s = a @ columns[cols].T
                if targets is not None:
                    hit, idx = _in_block(targets[rows], cols.start, s.shape[1])
                    picked[rows] += torch.where(hit, s.gather(1, idx), 0.0).squeeze(1)
                _fill_excluded(s, ex, cols.start, MASK_FILL)
                running = torch.logaddexp(running, torch.logsumexp(s, dim=1))
                del s
            lse[rows] = running
        ctx.save_for_backward(anchors, columns, scale, lse, targets, exclude)
        ctx.tile = tile
        return lse - picked

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        # Autograd runs a backward in the autocast state of the thread that called backward():
        # a loop that calls it inside ``with torch.autocast(...)`` (CPU or CUDA) would get the
        # block matmuls in bf16 against the fp32 accumulators ("mat1 and mat2 must have the
        # same dtype"), so autocast is off here as in the forward.
        with fp32_region():
            return _tiled_backward(ctx, grad)


def _tiled_backward(ctx, grad: torch.Tensor) -> tuple:
    """:meth:`TiledCrossEntropy.backward`, in the dtype of the saved inputs."""
    anchors, columns, scale, lse, targets, exclude = ctx.saved_tensors
    need_a, need_c, need_s = ctx.needs_input_grad[:3]
    grad_a = torch.zeros_like(anchors) if need_a or need_s else None
    grad_c = torch.zeros_like(columns) if need_c else None
    if grad_a is None and grad_c is None:
        return None, None, None, None, None, None
    for rows in _blocks(anchors.shape[0], ctx.tile):
        a, shift, g = anchors[rows] * scale, lse[rows, None], grad[rows, None]
        ex = None if exclude is None else exclude[rows]
        for cols in _blocks(columns.shape[0], ctx.tile):
            c = columns[cols]
            p = (a @ c.T).sub_(shift).exp_()  # the softmax of this block
            _fill_excluded(p, ex, cols.start, 0.0)
            if targets is not None:  # minus the one-hot of the target
                hit, idx = _in_block(targets[rows], cols.start, p.shape[1])
                p.scatter_add_(1, idx, -hit.to(p.dtype))
            p.mul_(g)  # d loss / d (scale * logits)
            if grad_a is not None:
                grad_a[rows].addmm_(p, c)  # still to be multiplied by the scale
            if need_c:
                grad_c[cols].addmm_(p.T, a)
            del p
    grad_s = (grad_a * anchors).sum().reshape(scale.shape) if need_s else None
    if need_a:
        grad_a.mul_(scale)
    return grad_a if need_a else None, grad_c, grad_s, None, None, None


def _check_inputs(anchors: torch.Tensor, columns: torch.Tensor) -> None:
    for x, name in ((anchors, "anchors"), (columns, "columns")):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point [n, D] tensor")
    if anchors.shape[1] != columns.shape[1]:
        raise ValueError(
            f"anchors and columns must have the same D, got {tuple(anchors.shape)} "
            f"and {tuple(columns.shape)}"
        )
    if columns.shape[0] == 0:
        raise ValueError("columns is empty: a softmax needs at least one column")


def _check_index(index: torch.Tensor | None, n_rows: int, name: str) -> torch.Tensor | None:
    if index is None:
        return None
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
        raise ValueError(f"{name} must be an integer [R] tensor")
    if index.shape[0] != n_rows:
        raise ValueError(f"{name} has {index.shape[0]} entries for {n_rows} anchors")
    return index.long()


def _as_scale(scale: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 1-element tensor, got {scale.shape}")
        return scale.to(device=like.device, dtype=like.dtype).reshape(())
    return torch.tensor(float(scale), dtype=like.dtype, device=like.device)


def _promote(anchors: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(upcast(anchors).dtype, upcast(columns).dtype)
    return anchors.to(dtype), columns.to(dtype)


def tiled_logsumexp(
    anchors: torch.Tensor,
    columns: torch.Tensor,
    exclude: torch.Tensor | None = None,
    tile: int | None = DEFAULT_TILE,
    *,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Per anchor row, the log-sum-exp of ``scale * anchors @ columns.T`` over the columns,
    leaving out column ``exclude[r]`` of row r (-1 or None: none). Differentiable in anchors,
    columns and a tensor ``scale``; memory O(tile^2) beyond the inputs and their gradients.
    Returns [R] in the promoted input dtype (at least fp32)."""
    _check_inputs(anchors, columns)
    tile = _check_tile(DEFAULT_TILE if tile is None else tile)
    exclude = _check_index(exclude, anchors.shape[0], "exclude")
    with fp32_region():
        a, c = _promote(anchors, columns)
        if exclude is not None:
            exclude = exclude.to(a.device)
        return TiledCrossEntropy.apply(a, c, _as_scale(scale, a), None, exclude, tile)


def _excluded_in(
    exclude: torch.Tensor | None, n_rows: int, n_cols: int, device: torch.device
) -> torch.Tensor:
    """[R] bool: the row excludes a column that exists."""
    if exclude is None:
        return torch.zeros(n_rows, dtype=torch.bool, device=device)
    return (exclude >= 0) & (exclude < n_cols)


def _positive_mean_logit(
    a: torch.Tensor,
    c: torch.Tensor,
    row_labels: torch.Tensor,
    col_labels: torch.Tensor,
    exclude: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``a . c`` over each row's positives (columns with the row's label, the excluded
    one left out) and their count, from per-class column sums: O((R + N + classes) x D)."""
    n_rows, n_cols = a.shape[0], c.shape[0]
    ids = torch.unique(torch.cat([row_labels, col_labels]), return_inverse=True)[1]
    row_ids, col_ids = ids[:n_rows], ids[n_rows:]
    n_classes = int(ids.max()) + 1
    sums = c.new_zeros(n_classes, c.shape[1]).index_add(0, col_ids, c)
    counts = torch.bincount(col_ids, minlength=n_classes)
    pos_sum = (a * sums[row_ids]).sum(dim=1)
    n_pos = counts[row_ids]
    has_ex = _excluded_in(exclude, n_rows, n_cols, a.device)
    if exclude is not None:
        ex = exclude.clamp(0, n_cols - 1)
        self_pos = has_ex & (col_ids[ex] == row_ids)
        pos_sum = pos_sum - torch.where(self_pos, (a * c[ex]).sum(dim=1), 0.0)
        n_pos = n_pos - self_pos.long()
    return pos_sum / n_pos.clamp(min=1).to(a.dtype), n_pos


def tiled_cross_entropy(
    anchors: torch.Tensor,
    columns: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    row_labels: torch.Tensor | None = None,
    col_labels: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
    tile: int | None = DEFAULT_TILE,
) -> torch.Tensor:
    """Per anchor row, the cross-entropy of ``softmax(scale * anchors @ columns.T)`` at its
    positive column(s), with the [R, N] logits computed one block at a time. Returns [R].

    The softmax of row r runs over every column except ``exclude[r]`` (-1: none). Positives:

    - ``targets`` [R]: one positive column per row; the loss is ``lse_r - logit[r, targets[r]]``
      (``F.cross_entropy`` with ``reduction="none"``);
    - ``row_labels`` [R] and ``col_labels`` [N]: every column with the row's label except the
      excluded one; the loss is ``lse_r - mean over positives of logit`` (SupCon's L_out
      before its T/base_T factor), 0 for a row without positives;
    - neither: the plain log-sum-exp (the denominator alone).

    ``scale`` (1/T, or CLIP's ``exp(logit_scale)`` as a tensor with gradient) multiplies the
    logits. Gradients reach anchors, columns and a tensor ``scale``.
    """
    tile = _check_tile(DEFAULT_TILE if tile is None else tile)
    _check_inputs(anchors, columns)
    n_rows, n_cols = anchors.shape[0], columns.shape[0]
    targets = _check_index(targets, n_rows, "targets")
    exclude = _check_index(exclude, n_rows, "exclude")
    if (row_labels is None) != (col_labels is None):
        raise ValueError("pass both row_labels and col_labels, or neither")
    if targets is not None and row_labels is not None:
        raise ValueError("pass targets or labels, not both")
    if row_labels is not None:
        row_labels = _check_index(row_labels, n_rows, "row_labels")
        col_labels = _check_index(col_labels, n_cols, "col_labels")
    with fp32_region():
        a, c = _promote(anchors, columns)
        scale = _as_scale(scale, a)
        dev = a.device
        if exclude is not None:
            exclude = exclude.to(dev)
        if targets is not None:
            targets = targets.to(dev)
            if not bool(((targets >= 0) & (targets < n_cols)).all()):
                raise ValueError(f"targets must lie in [0, {n_cols})")
            return TiledCrossEntropy.apply(a, c, scale, targets, exclude, tile)
        lse = TiledCrossEntropy.apply(a, c, scale, None, exclude, tile)
        if row_labels is None:
            return lse
        pos_mean, n_pos = _positive_mean_logit(
            a, c, row_labels.to(dev), col_labels.to(dev), exclude
        )
        return torch.where(n_pos > 0, lse - scale * pos_mean, 0.0)
