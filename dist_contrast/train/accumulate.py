"""Gradient accumulation for contrastive batches.

Plain accumulation splits a rank's batch into A micro-batches and each computes its own loss:
negatives per query shrink to the micro-batch. Cached accumulation (GradCache, Gao et al. 2021)
keeps the negatives of the whole batch with the activation memory of one micro-batch:

1. embed each micro-batch without gradient, remembering the RNG state before each;
2. compute the loss on all A x b embeddings (gathered across ranks as usual) and its gradient
   with respect to the embeddings and to the loss's own parameters (a learnable temperature);
3. re-embed each micro-batch with gradient, replaying its RNG state (same dropout, same random
   ops), and back-propagate the cached embedding gradients through it.

The loss's own parameters get their gradient once, with the first micro-batch. The engine is any
object with DeepSpeed's interface: ``engine(batch, mode=...)``, ``engine.backward(loss)`` (which
divides by the accumulation steps) and ``engine.step()`` (an optimizer step at the last one).
"""

from __future__ import annotations

from typing import Any

import torch

from dist_contrast.losses.kernels.numerics import upcast
from dist_contrast.methods.base import LossOutput


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """``parts`` equal micro-batches along the first dimension (tensors and lists)."""
    n = len(next(iter(batch.values())))
    if n % parts:
        raise ValueError(f"a batch of {n} does not split into {parts} equal micro-batches")
    size = n // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def plain_step(engine, batch: dict[str, Any], parts: int) -> LossOutput:
    """A micro-batches, each with its own loss; the mean loss is reported, with the metrics
    and embeddings of the last micro-batch."""
    losses = []
    for micro in split_batch(batch, parts):
        out = engine(micro)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach())
    return LossOutput(torch.stack(losses).mean(), out.metrics, out.embeddings)


def cached_step(engine, batch: dict[str, Any], parts: int) -> LossOutput:
    """One optimizer step over ``batch`` with the negatives of the whole batch (GradCache)."""
    micro = split_batch(batch, parts)
    states, embs = [], []
    with torch.no_grad():
        for mb in micro:
            states.append(_rng_state())
            embs.append(engine(mb, mode="embed"))
    cache = {k: upcast(torch.cat([e[k] for e in embs])).requires_grad_(True) for k in embs[0]}
    loss_params = [p for p in engine.module.loss_parameters() if p.requires_grad]
    out = engine(batch, mode="loss", cache=cache)
    grads = torch.autograd.grad(out.loss, [*cache.values(), *loss_params], allow_unused=True)
    emb_grads = {
        k: torch.zeros_like(cache[k]) if g is None else g
        for k, g in zip(cache, grads[: len(cache)], strict=True)
    }
    param_grads = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(loss_params, grads[len(cache) :], strict=True)
    ]
    after = _rng_state()
    start = 0
    for i, mb in enumerate(micro):
        _set_rng_state(states[i])
        n = len(next(iter(mb.values())))
        surrogate = engine(
            mb,
            mode="surrogate",
            grads={k: g[start : start + n] for k, g in emb_grads.items()},
            param_grads=param_grads if i == 0 else None,
        )
        engine.backward(surrogate * parts)  # the engine divides by the accumulation steps
        engine.step()
        start += n
    _set_rng_state(after)
    return LossOutput(out.loss.detach(), out.metrics, out.embeddings)
