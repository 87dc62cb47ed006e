"""The InstDisc memory bank (Wu et al. 2018), sharded across ranks by sample index.

One unit row per training sample; sample ``i`` lives on rank ``i % W`` at local slot ``i // W``
(strided, so shards differ by at most one row). Every rank samples negatives from its own
shard, and the non-parametric softmax (or NCE) of a feature is taken over the negatives of all
ranks through the distributed reductions of :mod:`dist_contrast.losses.kernels.dlse`; the rows
themselves never move, except the positives (each sample's own row), fetched from their owners.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_contrast import distributed
from dist_contrast.distributed import multi_rank
from dist_contrast.losses.checks import (
    check_choice,
    check_input_pair,
    check_temperature,
)
from dist_contrast.losses.kernels.dlse import combine_logsumexp, combine_sum, local_logsumexp
from dist_contrast.losses.kernels.numerics import fp32_region, normalize
from dist_contrast.losses.nce import MODES, check_nce_args, nce_log_z, nce_terms
from dist_contrast.losses.reduce import global_mean
from dist_contrast.negatives.rows import (
    check_int,
    check_saved_world,
    check_shard_state,
    move_buffers,
    unit_rows,
    world_rank,
)


def _total_negatives(k: int) -> int:
    return int(distributed.all_reduce_sum([float(k)])[0]) if multi_rank() else k


def _check_bank_inputs(features, positives, negatives, temperature) -> None:
    check_input_pair(features, positives, "features", "positives")
    if negatives.dim() != 2 or negatives.shape[1] != features.shape[1]:
        raise ValueError(
            f"negatives must have shape [k, {features.shape[1]}], got {tuple(negatives.shape)}"
        )
    check_temperature(temperature)


def _normalized(features, positives, negatives, temperature):
    """Unit features (with gradient), positives and negatives (without), positive logits."""
    f = normalize(features)
    p = normalize(positives.detach()).to(f.dtype)
    neg = normalize(negatives.detach()).to(f.dtype)
    return f, p, neg, (f * p).sum(dim=1) / temperature


def _log_z(pos: torch.Tensor, neg_logits: torch.Tensor, n_data: int, k_total: int) -> torch.Tensor:
    """InstDisc's ``log Z``, ``Z = n_data * mean(exp(logits))`` over the positive and the
    negative logits of every rank's features (in fp64, without gradient)."""
    with torch.no_grad():
        lse_neg = combine_logsumexp(torch.logsumexp(neg_logits.detach().double(), dim=1))
        pos_all = distributed.all_gather_no_grad(pos.detach().double())
        total = torch.logsumexp(torch.cat([lse_neg, pos_all]), dim=0)
        return nce_log_z(total, pos_all.shape[0] * (1 + k_total), n_data)


def estimate_bank_z(
    features: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    n_data: int | None = None,
) -> float:
    """``Z = n_data * mean(exp(s / T))`` over the similarities of every rank's features to
    their positives and to the negatives of every rank (a collective; the same on all ranks)."""
    n_data = check_int(n_data, "n_data", 1)
    _check_bank_inputs(features, positives, negatives, temperature)
    with fp32_region(), torch.no_grad():
        f, _, neg, pos = _normalized(features, positives, negatives, temperature)
        neg_logits = distributed.all_gather_no_grad(f) @ neg.T / temperature
        return float(_log_z(pos, neg_logits, n_data, _total_negatives(negatives.shape[0])).exp())


def bank_loss(
    features: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    *,
    mode: str = "nce",
    n_data: int | None = None,
    z: float | None = None,
    proximal: float = 0.0,
    tile: int | None = None,
    whole_bank: bool = False,
) -> torch.Tensor:
    """InstDisc's objective with the negatives sampled on every rank (a collective).

    ``features`` [n, D]: this rank's embeddings; ``positives`` [n, D]: their own bank rows
    (:meth:`MemoryBank.fetch`); ``negatives`` [k, D]: rows sampled from this rank's shard
    (:meth:`MemoryBank.sample_negatives`). Every feature is scored against the K = sum_r k_r
    negatives of all ranks, as :func:`dist_contrast.losses.nce_loss` scores it against
    ``negatives_0 || ... || negatives_{W-1}`` (shared by the batch) on one process. Convention
    as there: all rows L2-normalised, similarities divided by ``temperature``;

    - ``mode="softmax"``: cross-entropy of the positive among the 1 + K (distributed LSE);
      with ``whole_bank`` the negatives are every rank's whole shard, which holds each
      sample's own row already: the denominator is then the bank's K rows alone, each once
      (InstDisc's ``P(i | v) = exp(v_i . f / T) / sum_j exp(v_j . f / T)`` over all n rows);
    - ``mode="nce"``: ``-log h(pos) - sum_neg log(1 - h(neg))``, ``h = P / (P + K / n_data)``,
      ``P = exp(s / T) / Z``; the sum over negatives is a per-rank partial sum, all-reduced.
      ``Z`` is ``z`` or, if None, estimated from this step over every rank (no gradient);
    - ``proximal`` = lambda > 0 adds InstDisc's proximal term ``lambda * ||f_i - v_i||^2``
      between the normalised feature and its bank row (the previous epoch's feature).

    No gradient flows into the bank. Returns ``W * sum_i loss_i / N`` (the mean over this
    rank's samples with equal batches; W ranks with averaged gradients equal one process on
    the global batch). fp32 (fp64 stays fp64) whatever the autocast. ``tile`` bounds the
    softmax logits held at once (mode "softmax" only).
    """
    n_data = check_nce_args(mode, n_data, z)
    proximal = float(proximal)
    if not proximal >= 0:
        raise ValueError(f"proximal must be >= 0, got {proximal}")
    _check_bank_inputs(features, positives, negatives, temperature)
    with fp32_region():
        f, p, neg, pos = _normalized(features, positives, negatives, temperature)
        f_all, offset = distributed.all_gather_with_offset(f)
        own = slice(offset, offset + f.shape[0])
        if mode == "softmax":
            lse_neg = combine_logsumexp(local_logsumexp(f_all, neg, temperature, tile))[own]
            per_sample = (lse_neg if whole_bank else torch.logaddexp(pos, lse_neg)) - pos
        else:
            neg_logits = f_all @ neg.T / temperature
            k_total = _total_negatives(negatives.shape[0])
            log_z = math.log(z) if z is not None else _log_z(pos, neg_logits, n_data, k_total)
            log_k_noise = math.log(k_total / n_data)
            pos_term, neg_terms = nce_terms(pos - log_z, neg_logits - log_z, log_k_noise)
            per_sample = pos_term + combine_sum(neg_terms.sum(dim=1))[own]  # all ranks' negatives
        if proximal > 0:
            per_sample = per_sample + proximal * (f - p).pow(2).sum(dim=1)
        return global_mean(per_sample.sum(), f_all.shape[0], True)


def _check_old_bank(states: list[dict], n_data: int, dim: int) -> tuple[int, float]:
    """``(W, z)`` of the bank that saved ``states``, once they are consistent with a bank of
    ``n_data`` rows of ``dim`` and agree on z."""
    world = check_saved_world(states, "memory bank")
    for r, state in enumerate(states):
        if state.get("n_data") != n_data:
            raise ValueError(
                f"memory bank shard state {r} has n_data {state.get('n_data')}, this bank {n_data}"
            )
        want = (len(range(r, n_data, world)), dim)
        if tuple(state["rows"].shape) != want:
            raise ValueError(
                f"memory bank shard state {r} has rows {tuple(state['rows'].shape)}, "
                f"expected {want}"
            )
    zs = sorted({float(state["z"]) for state in states})
    if len(zs) > 1:
        raise ValueError(f"memory bank shard states disagree on z: {zs}")
    return world, zs[0]


def _last_occurrence(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct slots and, for each, the position of its last occurrence."""
    unique, inverse = torch.unique(slots, return_inverse=True)
    positions = torch.arange(slots.shape[0], device=slots.device)
    last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, positions, "amax")
    return unique, last


class MemoryBank(nn.Module):
    """One L2-normalised row per training sample, ``n_data`` rows of ``dim``, sharded by index:
    sample ``i`` is owned by rank ``i % W`` at local slot ``i // W``.

    - Storage: buffer ``rows`` [ceil((n_data - rank) / W), dim] in ``dtype`` (fp32 whatever the
      autocast), ``persistent=False``: it moves with ``.to()``, is not in
      ``module.state_dict()`` and keeps its dtype when an enclosing model is cast. The buffer
      ``z`` holds NCE's normalisation constant once estimated (0 before). Each rank saves
      :meth:`shard_state_dict` (rows, z, its sampling generator) in its own file.
    - Initialisation: random unit rows; row ``i`` from a generator seeded with
      ``(seed, i // 1024)``: the same bank whatever W. With the strided layout every rank
      draws all n_data x dim numbers once at start and keeps its 1 / W of them (about a second
      per million rows of 128 on a CPU core).
    - :meth:`fetch` (positives) and :meth:`update` (InstDisc's momentum update
      ``v <- normalize(m v + (1 - m) f)``, routed to the owners) are collectives;
      :meth:`sample_negatives` draws uniformly, with replacement, from this rank's shard.
    - :meth:`loss`: fetch the positives, sample ``k`` negatives per rank, :func:`bank_loss`.
    - Checkpoints: :meth:`shard_state_dict` per rank; :meth:`load_shard_state_dict` on the same
      ranks, :meth:`load_rerouted` on another number of ranks.

    A training step: ``loss = bank.loss(f, idx, k)``; backward; ``bank.update(idx, f)``.
    """

    def __init__(
        self,
        n_data: int,
        dim: int,
        *,
        momentum: float = 0.5,
        world: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        check_int(n_data, "n_data", 1)
        check_int(dim, "dim", 1)
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.world, self.rank = world_rank(world, rank)
        if n_data < self.world:
            raise ValueError(f"n_data ({n_data}) must be >= the number of ranks ({self.world})")
        if tile is not None:
            check_int(tile, "tile", 1)
        self.n_data, self.dim, self.momentum, self.tile = n_data, dim, momentum, tile
        owned = torch.arange(self.rank, n_data, self.world)
        self.register_buffer("rows", unit_rows(owned, dim, seed, dtype), persistent=False)
        self.register_buffer("z", torch.zeros((), dtype=torch.float64), persistent=False)
        self.seed = seed
        self.generator = self.fresh_generator()

    def fresh_generator(self) -> torch.Generator:
        """This rank's sampling generator at the start of a run: seeded with (seed, rank)."""
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + 7_919 * (self.rank + 1)) % 2**63
        )

    def _apply(self, fn, recurse: bool = True):
        return move_buffers(self, fn)

    @property
    def shard_size(self) -> int:
        return self.rows.shape[0]

    def extra_repr(self) -> str:
        return (
            f"n_data={self.n_data}, dim={self.dim}, shard={self.shard_size}, "
            f"rank={self.rank}/{self.world}, momentum={self.momentum}, dtype={self.rows.dtype}"
        )

    def owner(self, indices: torch.Tensor) -> torch.Tensor:
        return indices % self.world

    def _gather_indices(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        if indices.dim() != 1 or indices.is_floating_point():
            raise ValueError(f"indices must be a 1-d integer tensor, got {indices.dtype}")
        with torch.no_grad():
            all_idx, offset = distributed.all_gather_with_offset(indices.to(torch.int64))
        # checked after the gather: every rank sees the same indices and raises alike
        if all_idx.numel() and (int(all_idx.min()) < 0 or int(all_idx.max()) >= self.n_data):
            bad = int(all_idx[(all_idx < 0) | (all_idx >= self.n_data)][0])
            raise ValueError(f"sample index {bad} outside the memory bank (0..{self.n_data - 1})")
        return all_idx.to(self.rows.device), offset

    @torch.no_grad()
    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """The bank rows of this rank's samples [n, dim] (no gradient). A collective: the
        indices of every rank are gathered (N int64), each rank fills the rows it owns into an
        [N, dim] buffer of zeros, and an all_reduce SUM (N x dim, exact: one non-zero term per
        entry) gives every rank the rows; this rank keeps its own n."""
        all_idx, offset = self._gather_indices(indices)
        mine = self.owner(all_idx) == self.rank
        out = self.rows.new_zeros(all_idx.shape[0], self.dim)
        out[mine] = self.rows[all_idx[mine] // self.world]
        if multi_rank():
            torch.distributed.all_reduce(out)
        return out[offset : offset + indices.shape[0]]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """InstDisc's momentum update of the rows of this step's samples (a collective):
        ``v <- normalize(m v + (1 - m) normalize(f))``. Indices and features of every rank are
        gathered (no gradient; N int64 + N x dim); each rank updates the rows it owns. A sample
        present more than once in the global batch takes the update of its last occurrence
        (rank order, then batch order)."""
        if features.dim() != 2 or features.shape != (indices.shape[0], self.dim):
            raise ValueError(
                f"features must have shape [{indices.shape[0]}, {self.dim}], "
                f"got {tuple(features.shape)}"
            )
        all_idx, _ = self._gather_indices(indices)
        with fp32_region():
            f = normalize(features.detach())
        all_f = distributed.all_gather_no_grad(f).to(self.rows.device, self.rows.dtype)
        mine = self.owner(all_idx) == self.rank
        slots, last = _last_occurrence(all_idx[mine] // self.world)
        new = all_f[mine][last]
        with fp32_region():
            mixed = self.momentum * self.rows[slots] + (1.0 - self.momentum) * new
            self.rows.index_copy_(0, slots, F.normalize(mixed, dim=1))

    @torch.no_grad()
    def sample_negatives(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` rows [k, dim] drawn uniformly with replacement from this rank's shard (local;
        the bank's own generator unless one is given). A sample's own row is not excluded
        (as in InstDisc); with k per rank the batch is scored against W * k negatives."""
        check_int(k, "k", 1)
        slots = torch.randint(self.shard_size, (k,), generator=generator or self.generator)
        return self.rows[slots.to(self.rows.device)]

    def loss(
        self,
        features: torch.Tensor,
        indices: torch.Tensor,
        k: int,
        *,
        mode: str = "nce",
        temperature: float = 0.07,
        proximal: float = 0.0,
    ) -> torch.Tensor:
        """:func:`bank_loss` of ``features`` [n, dim] of the samples ``indices`` [n] against
        their own rows and ``k`` negatives sampled on every rank. In mode "nce" Z is estimated
        on the first call over every rank and kept in ``z`` (as InstDisc does)."""
        check_choice(mode, "mode", MODES)
        positives = self.fetch(indices)
        negatives = self.sample_negatives(k)
        z = None
        if mode == "nce":
            if float(self.z) == 0.0:
                z = estimate_bank_z(features, positives, negatives, temperature, self.n_data)
                self.z.fill_(z)
            z = float(self.z)
        return bank_loss(
            features,
            positives,
            negatives,
            temperature,
            mode=mode,
            n_data=self.n_data,
            z=z,
            proximal=proximal,
            tile=self.tile,
        )

    def shard_state_dict(self) -> dict:
        """This rank's part of the checkpoint: its rows, Z and its sampling generator."""
        return {
            "rows": self.rows.detach().cpu().clone(),
            "z": float(self.z),
            "generator": self.generator.get_state(),
            "n_data": self.n_data,
            "world": self.world,
            "rank": self.rank,
        }

    def load_shard_state_dict(self, state: dict) -> None:
        """Restore what :meth:`shard_state_dict` returned on the same rank of a job with the
        same number of ranks and the same data set size."""
        want = {"n_data": self.n_data, "world": self.world, "rank": self.rank}
        rows = check_shard_state(state, want, "rows", self.rows, "memory bank", "this bank")
        self.rows.copy_(rows.to(self.rows.dtype))
        self.z.fill_(float(state["z"]))
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def load_rerouted(self, states: list[dict]) -> bool:
        """Take this rank's rows of a bank saved by any number of ranks: ``states`` are every
        old rank's :meth:`shard_state_dict`, in rank order (each new rank reads them all: the
        whole bank in CPU memory, n_data x dim).

        Row ``i`` (old rank ``i % W`` slot ``i // W``) moves to rank ``i % W'`` slot
        ``i // W'``; ``z`` is the same on every old rank (checked); the sampling generator is
        the old one of this rank where it existed, else a fresh one (seed, rank). The same
        ranks restore exactly (:meth:`load_shard_state_dict`) and return False; else True."""
        old_world, z = _check_old_bank(states, self.n_data, self.dim)
        if old_world == self.world:
            self.load_shard_state_dict(states[self.rank])
            return False
        index = torch.arange(self.rank, self.n_data, self.world)
        old_rank, old_slot = index % old_world, index // old_world
        rows = torch.empty(self.shard_size, self.dim, dtype=self.rows.dtype)
        for r, state in enumerate(states):
            mine = old_rank == r
            rows[mine] = state["rows"][old_slot[mine]].to(rows.dtype)
        self.rows.copy_(rows)
        self.z.fill_(z)
        if self.rank < old_world:
            self.generator.set_state(states[self.rank]["generator"])
        else:
            self.generator = self.fresh_generator()
        return True
