"""The MoCo queue, sharded across ranks (He et al. 2020; MoCo v2, Chen et al. 2020).

Each of the W ranks holds K_total / W keys in a ring buffer and enqueues only its own keys
(nothing is gathered on enqueue). A query is scored against the queue of *every* rank through a
distributed log-sum-exp (:mod:`dist_contrast.losses.kernels.dlse`): the queries are gathered, each
rank scores them against its shard, the per-shard log-sum-exps are combined. So every query
sees all K_total negatives while the memory each rank spends on the queue stays flat in W.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast import distributed
from dist_contrast.losses.checks import check_input_pair, check_temperature
from dist_contrast.losses.kernels.dlse import distributed_logsumexp
from dist_contrast.losses.kernels.numerics import fp32_region, normalize, upcast
from dist_contrast.losses.kernels.tiled import tiled_logsumexp
from dist_contrast.losses.reduce import global_mean
from dist_contrast.negatives.rows import (
    check_int,
    check_saved_world,
    check_shard_state,
    move_buffers,
    unit_rows,
    world_rank,
)


def nearest_queue_size(size: int, world: int) -> int:
    """The multiple of ``world`` nearest to ``size`` (the lower one on a tie, at least
    ``world``): a queue size that ``world`` ranks can share."""
    lower = size - size % world
    if lower == 0:
        return world
    return lower if size - lower <= lower + world - size else lower + world


def reshard_phrase(name: str, old: int, new: int, copies: int = 1) -> str:
    """What a resume says of queues re-sharded from ``old`` to ``new`` keys each:
    ``"queue 65,536 keys re-sharded"``, ``"image/text queues 2 x 4,096 keys re-sharded"``,
    ``"queue 4,096 keys re-sharded into 4,095 (newest kept)"``."""
    times = f"{copies} x " if copies > 1 else ""
    phrase = f"{name} {times}{old:,} keys re-sharded"
    if new < old:
        return f"{phrase} into {times}{new:,} (newest kept)"
    if new > old:
        return f"{phrase} into {times}{new:,} ({new - old:,} fresh as the oldest)"
    return phrase


def _check_old_queue(states: list[dict], dim: int) -> tuple[int, int]:
    """``(W, K_shard)`` of the queue that saved ``states``, once they are consistent."""
    world = check_saved_world(states, "queue")
    size = states[0].get("size")
    for state in states:
        shard = (state.get("size"), *state["keys"].shape)
        if shard != (size, size // world, dim) or size % world:
            raise ValueError(
                f"queue shard state {state['rank']} holds keys {tuple(state['keys'].shape)} of "
                f"a queue of {state.get('size')}; expected [{size} / {world}, {dim}] (dimension "
                f"{dim}) on every rank"
            )
        if not 0 <= int(state["ptr"]) < size // world:
            raise ValueError(f"queue shard state {state['rank']} has pointer {state['ptr']}")
    return world, size // world


def queue_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    shard: torch.Tensor,
    temperature: float = 0.07,
    *,
    tile: int | None = None,
    shard_normalized: bool = False,
) -> torch.Tensor:
    """InfoNCE of this rank's queries against the queue shards of every rank.

    Convention (MoCo, as :func:`dist_contrast.losses.info_nce` with ``negatives``): ``q``,
    ``k`` [n, D] and the queue rows are L2-normalised, logits are dot products divided by
    ``temperature``, and the loss of ``q[i]`` is the cross-entropy of its key ``k[i]`` (the
    positive, scored on this rank) among ``k[i]`` and the K_total negatives, which are the
    concatenation over ranks of each rank's ``shard`` [K_r, D]. No gradient flows into the
    shard; keys are not detached here (a momentum encoder's come without gradient).

    Returns ``W * sum_i loss_i / N`` (N queries over all ranks): the mean over this rank's
    queries when ranks hold equal batches; in general the mean over ranks of these values is
    the global mean, and W ranks with averaged gradients get the gradients of one process on
    the global batch with the queue ``shard_0 || ... || shard_{W-1}``. A collective: every
    rank calls it. Runs in fp32 (fp64 stays fp64) whatever the autocast. ``tile`` bounds the
    logits held at once to N x ``tile`` (see :func:`dlse.local_logsumexp`);
    ``shard_normalized=True`` skips normalising the shard (ShardedQueue stores unit rows).
    """
    check_input_pair(q, k, "q", "k")
    if shard.dim() != 2 or shard.shape[1] != q.shape[1]:
        raise ValueError(f"shard must have shape [K, {q.shape[1]}], got {tuple(shard.shape)}")
    check_temperature(temperature)
    with fp32_region():
        qn, kn = normalize(q), normalize(k)
        negatives = shard.detach() if shard_normalized else normalize(shard.detach())
        pos = (qn * kn).sum(dim=1) / temperature
        lse_neg, n_all = distributed_logsumexp(qn, negatives.to(qn.dtype), temperature, tile)
        per_query = torch.logaddexp(pos, lse_neg) - pos
        return global_mean(per_query.sum(), n_all, True)


def queue_clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_shard: torch.Tensor,
    text_shard: torch.Tensor,
    scale: torch.Tensor,
    *,
    tile: int | None = None,
) -> torch.Tensor:
    """CLIP's symmetric loss with extra negatives from two sharded queues.

    ``image``, ``text`` [n, D]: this rank's features of n pairs (with gradient);
    ``image_shard``, ``text_shard``: this rank's shards of the image and text queues (unit
    rows, no gradient; in :class:`dist_contrast.methods.clip.CLIP` they hold the momentum
    towers' features of earlier steps, as in ALBEF, Li et al. 2021). Everything is
    L2-normalised; logits are ``scale * cosine`` (``scale`` the clamped exp of the learnable
    logit scale, with gradient). Image ``i`` is scored against the texts of the global batch
    (gathered with gradient, CLIP's local loss) and the K_total rows of the text queue (every
    rank's shard, distributed log-sum-exp); its positive is its own text. Texts likewise
    against the images and the image queue. The loss is the mean of the two cross-entropies;
    returns ``W * sum / N`` as the other distributed losses do (mean over ranks = the global
    mean; averaged gradients = one process on the global batch with the concatenated queue
    shards). ``tile``: the tiled softmax for the batch and the queue. A collective.
    """
    check_input_pair(image, text, "image", "text")
    with fp32_region():
        img, txt = normalize(image), normalize(text)
        all_img, _ = distributed.all_gather_with_offset(img)
        all_txt, _ = distributed.all_gather_with_offset(txt)
        s = upcast(scale)
        pos = s * (img * txt).sum(dim=1)
        total = img.new_zeros(())
        for q, cols, shard in ((img, all_txt, text_shard), (txt, all_img, image_shard)):
            if tile is None:
                lse_batch = torch.logsumexp(s * q @ cols.T, dim=1)
            else:
                lse_batch = tiled_logsumexp(q, cols, tile=tile, scale=s)
            lse_queue, n_all = distributed_logsumexp(q * s, shard.detach().to(q.dtype), 1.0, tile)
            total = total + (torch.logaddexp(lse_batch, lse_queue) - pos).sum()
        return global_mean(total / 2, n_all, True)


class ShardedQueue(nn.Module):
    """A MoCo queue of ``size`` = K_total keys of dimension ``dim``, of which this rank holds
    K_shard = K_total / W (W must divide ``size``).

    - Storage: the buffer ``keys`` [K_shard, dim] of unit rows in ``dtype`` (fp32 by default,
      whatever the autocast), registered with ``persistent=False``: it moves with ``.to()`` but
      is not in ``module.state_dict()`` (which DeepSpeed saves from one rank); it keeps its
      dtype when an enclosing model is cast (``.half()``, ``.bfloat16()``). Each rank saves
      :meth:`shard_state_dict` in its own file and loads it with :meth:`load_shard_state_dict`.
    - Initialisation: random unit vectors; global row ``i`` (rank ``i // K_shard``, slot
      ``i % K_shard``) comes from a generator seeded with ``(seed, i // 1024)``, so every rank
      starts from different rows and the W shards put together are the queue one process would
      start from with the same ``size`` and ``seed``, whatever W.
    - :meth:`enqueue`: this rank's keys only, detached, normalised, written in order at a ring
      pointer that wraps around (the batch need not divide K_shard; a batch larger than
      K_shard leaves its last K_shard keys). Deterministic.
    - Checkpoints: :meth:`shard_state_dict` per rank; :meth:`load_shard_state_dict` on the same
      ranks, :meth:`load_resharded` on another number of ranks (or another size).
    - :meth:`info_nce`: every query against all K_total keys (a collective), see
      :func:`queue_info_nce`. MoCo scores against the queue first and enqueues after.
    """

    def __init__(
        self,
        dim: int,
        size: int,
        *,
        world: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        check_int(dim, "dim", 1)
        check_int(size, "size", 1)
        self.world, self.rank = world_rank(world, rank)
        if size % self.world:
            raise ValueError(
                f"queue size {size} must be a multiple of the number of ranks {self.world} "
                f"(each holds size / ranks keys); e.g. {nearest_queue_size(size, self.world)}"
            )
        if tile is not None:
            check_int(tile, "tile", 1)
        self.dim, self.size, self.seed, self.tile = dim, size, seed, tile
        shard = size // self.world
        rows = torch.arange(self.rank * shard, (self.rank + 1) * shard)
        self.register_buffer("keys", unit_rows(rows, dim, seed, dtype), persistent=False)
        self._ptr = 0

    def _apply(self, fn, recurse: bool = True):
        return move_buffers(self, fn)

    @property
    def shard_size(self) -> int:
        return self.keys.shape[0]

    @property
    def ptr(self) -> int:
        """The slot the next enqueued key goes to."""
        return self._ptr

    @property
    def negatives_per_query(self) -> int:
        return self.size

    @property
    def shard_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, size={self.size}, shard={self.shard_size}, "
            f"rank={self.rank}/{self.world}, dtype={self.keys.dtype}"
        )

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write this rank's keys [B, dim] (detached, L2-normalised, stored in the queue's
        dtype) at the ring pointer, in order, wrapping around. Local: no collective.

        Call it on the steps that are kept only (every rank decides alike): non-finite keys
        would stay in the queue until overwritten."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape [B, {self.dim}], got {tuple(keys.shape)}")
        with fp32_region():
            rows = normalize(keys.detach()).to(self.keys.dtype)
        n, size = rows.shape[0], self.shard_size
        kept = min(n, size)  # of a batch larger than the shard, the last `size` keys remain
        slots = (self._ptr + n - kept + torch.arange(kept, device=self.keys.device)) % size
        self.keys.index_copy_(0, slots, rows[n - kept :].to(self.keys.device))
        self._ptr = (self._ptr + n) % size

    def logsumexp(self, q: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
        """``(lse, N)``: log-sum-exp of ``q @ queue.T / temperature`` over all K_total keys for
        this rank's rows of ``q`` (used as given), and the number of queries over all ranks."""
        return distributed_logsumexp(q, self.keys, temperature, self.tile)

    def info_nce(self, q: torch.Tensor, k: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
        """InfoNCE of ``q`` against its key ``k`` and the K_total queued keys (a collective);
        see :func:`queue_info_nce` for the convention and the reduction."""
        return queue_info_nce(q, k, self.keys, temperature, tile=self.tile, shard_normalized=True)

    def shard_state_dict(self) -> dict:
        """This rank's part of the checkpoint: its keys, its pointer and the layout."""
        return {
            "keys": self.keys.detach().cpu().clone(),
            "ptr": self._ptr,
            "size": self.size,
            "world": self.world,
            "rank": self.rank,
        }

    def load_shard_state_dict(self, state: dict) -> None:
        """Restore what :meth:`shard_state_dict` returned on the same rank of a job with the
        same number of ranks and the same queue size."""
        want = {"size": self.size, "world": self.world, "rank": self.rank}
        keys = check_shard_state(state, want, "keys", self.keys, "queue", "this queue")
        ptr = int(state["ptr"])
        if not 0 <= ptr < self.shard_size:
            raise ValueError(f"queue shard state has pointer {ptr}, outside 0..{self.shard_size}")
        self.keys.copy_(keys.to(self.keys.dtype))
        self._ptr = ptr

    @torch.no_grad()
    def load_resharded(self, states: list[dict]) -> int | None:
        """Take this rank's share of a queue saved by any number of ranks: ``states`` are every
        old rank's :meth:`shard_state_dict`, in rank order (each new rank reads them all: the
        whole old queue in CPU memory, K_total x dim).

        The old queue in its global order by age, oldest first, is row ``j = a * W + r`` for
        age ``a = (slot - ptr_r) mod K_shard`` on old rank ``r``. Row ``j`` goes to new rank
        ``j % W'`` at slot ``j // W'``, pointer 0 (the next key overwrites the oldest), so the
        new shards in the same order are the old queue, row for row, and back and forth is the
        identity. A queue of another size keeps the newest rows that fit; where it has more, its
        oldest rows are those a fresh queue has there. The same ranks and size restore exactly
        (:meth:`load_shard_state_dict`) and return None; otherwise the old K_total."""
        old_world, old_shard = _check_old_queue(states, self.dim)
        old_size = old_world * old_shard
        if old_world == self.world and old_size == self.size:
            self.load_shard_state_dict(states[self.rank])
            return None
        slots = torch.arange(self.shard_size)
        rows = slots * self.world + self.rank + old_size - self.size  # in the old global order
        kept = rows >= 0
        old_rank, age = rows[kept] % old_world, rows[kept] // old_world
        ptrs = torch.tensor([int(state["ptr"]) for state in states])
        old_slot = (age + ptrs[old_rank]) % old_shard
        fresh = self.rank * self.shard_size + slots[~kept]  # the rows of a fresh queue
        new = torch.empty(self.shard_size, self.dim, dtype=self.keys.dtype)
        new[~kept] = unit_rows(fresh, self.dim, self.seed, new.dtype)
        for r, state in enumerate(states):
            mine = old_rank == r
            new[slots[kept][mine]] = state["keys"][old_slot[mine]].to(new.dtype)
        self.keys.copy_(new)
        self._ptr = 0
        return old_size
