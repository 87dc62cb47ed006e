"""MoCo v2 (He et al. 2020; Chen et al. 2020) and MoCo v3 (Chen, Xie, He 2021).

Both train an online encoder + projector (MoCo v3: + predictor) against a momentum twin of the
encoder + projector (:class:`MomentumMethod`, shared with BYOL). The twin is made with
``make_target`` when the method is built, before DeepSpeed wraps it, so ZeRO-3 partitions both
networks alike and the EMA runs on each rank's partitions (:func:`ema_update`). Keys come from
the twin without gradient. After each optimizer step (``on_step_end``) the twin follows the
online networks, and MoCo v2 enqueues this rank's keys of the step.

- MoCo v2: query ``q = online(view1)``, key ``k = target(view2)``; InfoNCE of ``q`` against
  ``k`` and the K_total keys of the sharded queue (every rank's shard, distributed
  log-sum-exp), temperature ``loss.temperature`` (0.2 in MoCo v2), constant momentum (0.999).
  Optional shuffle-BN (``method.shuffle_bn``, for ``model.norm=batch``): the key batch is
  shuffled across ranks before the key encoder and unshuffled after, so a key's batch
  statistics do not come from the batch its query sees.
- MoCo v3: ``q1, q2`` (predictor outputs of both views), ``k1, k2`` (twin); the symmetric
  ``ctr(q1, k2) + ctr(q2, k1)``, where ``ctr`` is InfoNCE against the keys of the global batch
  (gathered across ranks, no gradient), scaled by ``2 T`` as in the authors' code; the momentum
  follows a cosine from ``method.momentum`` to ``method.momentum_final``. Temperature: the
  authors' code defaults to T = 1.0, which their ResNet-50 recipes use; their ViT recipes pass
  0.2. Here it is ``loss.temperature`` (0.2 on digits, 1.0 in a ResNet-50 config).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast import distributed
from dist_contrast.config import Config
from dist_contrast.distributed import mix_seed
from dist_contrast.losses import InfoNCELoss
from dist_contrast.methods.base import LossOutput, Pending, calls_per_step
from dist_contrast.methods.momentum import MomentumMethod, momentum_kwargs, online_networks
from dist_contrast.models import build_predictor
from dist_contrast.negatives import ShardedQueue
from dist_contrast.negatives.queue import reshard_phrase


class MoCoV2(MomentumMethod):
    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        queue: ShardedQueue,
        *,
        temperature: float,
        shuffle_bn: bool = False,
        seed: int = 0,
        calls: int = 1,
        **momentum,
    ) -> None:
        super().__init__(encoder, projector, None, **momentum)
        self.queue, self.temperature = queue, temperature
        self.shuffle_bn, self.seed = shuffle_bn, seed
        self.pending = Pending(calls)
        self._key_calls = 0  # key batches embedded since the last step (shuffle-BN seeds)

    def embed_online(self, batch):
        return {"q": self.online(batch["view1"])}

    def embed(self, batch):
        return {**self.embed_online(batch), "k": self.keys(batch["view2"])}

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        # Shuffle-BN only matters where batch statistics are used: in training. An eval-mode
        # pass (the engine's alignment/uniformity) leaves the step's key-call count alone.
        multi = distributed.is_dist() and distributed.world_size() > 1
        if not (self.training and self.shuffle_bn and multi):
            return self.target(x)
        self._key_calls += 1
        return self._shuffled_keys(x, mix_seed(self.seed, self.step, self._key_calls, 11))

    def _shuffled_keys(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Shuffle-BN: the global key batch is permuted (the same permutation on every rank),
        each rank embeds its slice of the permuted batch, and the keys are put back in order."""
        world, rank, n = distributed.world_size(), distributed.rank(), x.shape[0]
        x_all = distributed.all_gather_no_grad(x)
        if x_all.shape[0] != world * n:
            raise ValueError("shuffle-BN needs the same batch size on every rank")
        perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(seed))
        perm = perm.to(x.device)
        k_perm = distributed.all_gather_no_grad(self.target(x_all[perm[rank * n : (rank + 1) * n]]))
        k_all = torch.empty_like(k_perm)
        k_all[perm] = k_perm  # row perm[j] of the batch was embedded at position j
        return k_all[rank * n : (rank + 1) * n]

    def loss(self, emb, batch):
        k = emb["k"].detach()
        loss = self.queue.info_nce(emb["q"], k, self.temperature)
        self.pending.add(k)
        return LossOutput(loss)

    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        for keys in self.pending.take():
            self.queue.enqueue(keys)
        self._key_calls = 0

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        return self.queue.negatives_per_query

    def extra_state(self) -> dict:
        return {**super().extra_state(), "queue": self.queue.shard_state_dict()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.queue.load_shard_state_dict(state["queue"])

    def load_extra_state_elastic(self, states: list[dict]) -> list[str]:
        said = super().load_extra_state_elastic(states)
        old = self.queue.load_resharded([state["queue"] for state in states])
        return said if old is None else [*said, reshard_phrase("queue", old, self.queue.size)]


class MoCoV3(MomentumMethod):
    def __init__(self, encoder, projector, predictor, loss: InfoNCELoss, **momentum) -> None:
        super().__init__(encoder, projector, predictor, **momentum)
        self.criterion = loss

    def embed_online(self, batch):
        return {"q1": self.online(batch["view1"]), "q2": self.online(batch["view2"])}

    def embed(self, batch):
        keys = {"k1": self.target(batch["view1"]), "k2": self.target(batch["view2"])}
        return {**self.embed_online(batch), **keys}

    def loss(self, emb, batch):
        k1, k2 = emb["k1"].detach(), emb["k2"].detach()
        scale = 2 * self.criterion.temperature
        loss = (self.criterion(emb["q1"], k2) + self.criterion(emb["q2"], k1)) * scale
        return LossOutput(loss)

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        return self.criterion.negatives_per_query(batch_size, world)


def build(cfg: Config) -> MomentumMethod:
    m = cfg.method
    tile = cfg.loss.tile if cfg.loss.memory_efficient else None
    if m.name == "moco_v2":
        encoder, projector = online_networks(cfg)
        queue = ShardedQueue(cfg.model.proj_dim, m.queue_size, seed=cfg.run.seed, tile=tile)
        return MoCoV2(
            encoder,
            projector,
            queue,
            temperature=cfg.loss.temperature,
            shuffle_bn=m.shuffle_bn,
            seed=cfg.run.seed,
            calls=calls_per_step(cfg),
            **momentum_kwargs(cfg),
        )
    if m.name == "moco_v3":
        encoder, projector = online_networks(cfg)
        loss = InfoNCELoss(
            cfg.loss.temperature, True, cfg.loss.gather, cfg.loss.memory_efficient, tile
        )
        return MoCoV3(
            encoder,
            projector,
            build_predictor(cfg.model),
            loss,
            **momentum_kwargs(cfg),
        )
    raise ValueError(f"module moco builds moco_v2 and moco_v3, not {m.name!r}")
