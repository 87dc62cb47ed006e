"""What the engine knows of a method: ``method(batch) -> LossOutput``.

A method is two halves: ``embed(batch) -> {name: embeddings}`` (the encoders; per sample, so a
batch can be embedded in micro-batches) and ``loss(embeddings, batch) -> LossOutput`` (the
objective over the whole batch: negatives, gathers). Cached accumulation (GradCache) runs the two
halves separately; ``forward`` dispatches on ``mode`` so that every call goes through the
DeepSpeed engine (and its ZeRO-3 parameter gathering).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.losses.kernels.numerics import upcast


@dataclass
class LossOutput:
    loss: torch.Tensor
    # figures to log: 0-dim tensors stay on the device, read at log steps only
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    # the embeddings the loss was computed from, detached (set by Method.forward): the log
    # step's alignment and uniformity read them instead of embedding the batch again
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module, metaclass=abc.ABCMeta):
    """A training objective around encoders. Subclasses set ``encoder`` (the network whose
    representation is evaluated and exported) and implement ``embed`` and ``loss``."""

    encoder: nn.Module

    @abc.abstractmethod
    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings of every sample of ``batch``, by name."""

    @abc.abstractmethod
    def loss(self, emb: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> LossOutput:
        """The objective over the embeddings of the whole (per-rank) batch."""

    def embed_online(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The embeddings that carry gradient: all of :meth:`embed` unless a method also embeds
        with a momentum copy (whose outputs the surrogate pass of cached accumulation skips)."""
        return self.embed(batch)

    def loss_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective itself (a learnable temperature)."""
        return []

    def sync_targets(self) -> None:
        """Set momentum copies (if any) to the online networks' weights: after weights were
        loaded into the towers (``model.init_from``)."""

    def towers(self) -> dict[str, nn.Module]:
        """The networks ``dist-contrast export`` writes, by name: ``image`` (the encoder: images
        [B, C, H, W] -> [B, D]) and ``heads`` (the projector and predictor that exist). A text
        tower is named ``text`` (int64 token ids [B, L] -> [B, D]). Momentum copies, queues and
        memory banks are training state and are not exported."""
        heads = {
            name: getattr(self, name)
            for name in ("projector", "predictor")
            if isinstance(getattr(self, name, None), nn.Module)
        }
        return {"image": self.encoder, "heads": nn.ModuleDict(heads)}

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        mode: str = "train",
        cache: dict[str, torch.Tensor] | None = None,
        grads: dict[str, torch.Tensor] | None = None,
        param_grads: list[torch.Tensor] | None = None,
    ):
        if mode == "train":
            return _with_embeddings(self.loss(emb := self.embed(batch), batch), emb)
        if mode == "embed":
            return self.embed(batch)
        if mode == "loss":
            return _with_embeddings(self.loss(cache, batch), cache)
        if mode == "surrogate":
            # sum <embedding, cached dL/dembedding> (+ <loss param, its cached gradient>): its
            # gradient is the chain rule's contribution of this micro-batch.
            emb = self.embed_online(batch)
            total = sum((upcast(emb[k]) * grads[k]).sum() for k in emb)
            for p, g in zip(self.loss_parameters(), param_grads or [], strict=False):
                total = total + (p * g).sum()
            return total
        raise ValueError(f"unknown mode {mode!r}")

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        """Negatives each query is scored against, for a per-rank batch of ``batch_size``."""
        return 0

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called by the engine after each optimizer step that was taken (not after a skipped
        one), with the number of steps done: momentum encoders follow the online one here."""

    def extra_state(self) -> dict:
        """This rank's state outside the module's parameters (a queue shard): saved per rank."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    def load_extra_state_elastic(self, states: list[dict]) -> list[str]:
        """Restore from what :meth:`extra_state` returned on every rank of a run with any
        number of ranks (``states`` in old-rank order): this rank takes its share of the
        rank-local state (queue shards, bank rows). Returns what was re-sharded, in short
        phrases for the resume line ([] where nothing moved: the same ranks restore exactly as
        :meth:`load_extra_state`). Here: state that every rank holds alike, checked to agree,
        then loaded from old rank 0."""
        _check_states(states)
        for i, state in enumerate(states):
            if state.keys() != states[0].keys():
                raise ValueError(f"extra state of rank {i} has other fields than rank 0's")
        for key in states[0]:
            agreed(states, key)
        self.load_extra_state(states[0])
        return []


def _with_embeddings(out: LossOutput, emb: dict[str, torch.Tensor]) -> LossOutput:
    if isinstance(out, LossOutput) and not out.embeddings:
        out.embeddings = {k: v.detach() for k, v in emb.items()}
    return out


def _check_states(states: list[dict]) -> None:
    if not states:
        raise ValueError("no extra states to load (one per rank of the saved run)")


def agreed(states: list[dict], key: str):
    """``states[r][key]``, the same on every old rank (a value every rank keeps alike, such as
    the step); a clear error if the ranks disagree."""
    _check_states(states)
    values = [state[key] for state in states]
    if any(value != values[0] for value in values[1:]):
        raise ValueError(f"extra state {key!r} differs between the saved ranks: {values}")
    return values[0]


class Pending:
    """Tensors recorded by the loss calls of the current step, consumed after the step.

    A step makes ``calls_per_step`` loss calls (1, or A with plain accumulation over A
    micro-batches). Rows still held when a new step starts belong to a step that was not taken
    (a skipped step never reaches ``on_step_end``): they are dropped."""

    def __init__(self, calls_per_step: int) -> None:
        if calls_per_step < 1:
            raise ValueError(f"calls_per_step must be >= 1, got {calls_per_step}")
        self.calls_per_step = calls_per_step
        self.items: list[tuple[torch.Tensor, ...]] = []

    def add(self, *tensors: torch.Tensor) -> None:
        if len(self.items) >= self.calls_per_step:
            self.items.clear()
        self.items.append(tuple(t.detach() for t in tensors))

    def take(self) -> list[torch.Tensor]:
        """The recorded tensors, concatenated per position; then empty."""
        items, self.items = self.items, []
        if not items:
            return []
        return [torch.cat(parts) for parts in zip(*items, strict=True)]


def calls_per_step(cfg: Config) -> int:
    """Loss calls per optimizer step: A micro-batches with plain accumulation, else one."""
    return cfg.train.accumulation if cfg.train.accumulation_mode == "plain" else 1
