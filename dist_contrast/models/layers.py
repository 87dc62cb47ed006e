"""Shared encoder parts: the normalisation choice and activation checkpointing of block lists."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORMS = ("batch", "sync_batch", "group", "none")


def check_norm(kind: str) -> None:
    """Raise a clear ValueError for a norm this machine cannot build.

    ``sync_batch`` is :class:`torch.nn.SyncBatchNorm`, whose forward only runs on accelerator
    tensors (torch 2.13 raises inside the forward for CPU inputs, gloo or not); on a machine
    without CUDA the choice is refused when the model is built, not at the first step."""
    if kind not in NORMS:
        raise ValueError(f"unknown model.norm {kind!r}; choose one of {', '.join(NORMS)}")
    if kind == "sync_batch" and not torch.cuda.is_available():
        raise ValueError(
            "model.norm=sync_batch needs CUDA (torch.nn.SyncBatchNorm does not run on CPU); "
            "use model.norm=batch (per-rank batch norm; for MoCo v2 add method.shuffle_bn=true) "
            "or model.norm=group"
        )


class _Fp32Statistics:
    """Batch norm that runs with bf16/fp16 weights and fp32 running statistics.

    DeepSpeed 0.19 in bf16/fp16 casts a module's parameters and leaves its buffers as they are
    (``data_types.buffer_dtype`` unset), so the affine weights become bf16 while the running
    mean and variance stay fp32; torch's CPU batch norm refuses that mix ("expected scalar type
    BFloat16 but found Float"). Here the weights are then upcast to the statistics' dtype for
    the call (a differentiable cast: their gradients come back in bf16): the mixed form torch
    supports, normalising in fp32 and returning the input's dtype. The statistics stay fp32,
    as under autocast. Same dtypes: the plain forward, unchanged (and traced as such)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats, w, b = self.running_mean, self.weight, self.bias
        if stats is None or w is None or w.dtype == stats.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0
        if self.training:  # running statistics are tracked (stats is not None)
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        w, b = w.to(stats.dtype), b.to(stats.dtype)
        return F.batch_norm(x, stats, self.running_var, w, b, self.training, factor, self.eps)


class BatchNorm1d(_Fp32Statistics, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` that also runs with bf16 weights and fp32 statistics."""


class BatchNorm2d(_Fp32Statistics, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` that also runs with bf16 weights and fp32 statistics."""


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """A 2-d normalisation layer over ``channels``.

    ``batch``: batch norm over this rank's batch. ``sync_batch``: batch norm over the global
    batch (statistics all-reduced across ranks each step). ``group``: group norm with
    ``gcd(groups, channels)`` groups, independent of the batch. ``none``: identity."""
    check_norm(kind)
    if kind == "batch":
        return BatchNorm2d(channels)
    if kind == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    return nn.Identity()


@contextmanager
def _keep_running_stats(module: nn.Module) -> Iterator[None]:
    """Restore the batch-norm running statistics of ``module`` on exit: a recomputed forward
    must not update them a second time."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(bns, saved, strict=True):
                for b, s in zip(m.buffers(), bufs, strict=True):
                    b.copy_(s)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``x`` through ``blocks`` in order. With ``checkpointing`` (and gradients enabled) each
    block runs under non-reentrant activation checkpointing: its inner activations are freed
    after the forward and recomputed in the backward. Batch-norm running statistics are
    updated once, by the first forward, as without checkpointing."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(
                block,
                x,
                use_reentrant=False,
                context_fn=lambda b=block: (nullcontext(), _keep_running_stats(b)),
            )
        else:
            x = block(x)
    return x
