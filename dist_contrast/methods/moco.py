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

import abc

import torch
from torch import nn

from dist_contrast import distributed
from dist_contrast.config import Config
from dist_contrast.data.sources import mix_seed
from dist_contrast.losses import InfoNCELoss
from dist_contrast.methods._choice import check_loss_name
from dist_contrast.methods.base import LossOutput, Method
from dist_contrast.models import build_encoder, build_head, build_predictor
from dist_contrast.negatives import ShardedQueue
from dist_contrast.negatives.momentum import ema_update, make_target, scheduled_momentum


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


class MomentumMethod(Method):
    """Online ``encoder`` -> ``projector`` (-> ``predictor``) and a momentum twin of encoder and
    projector, updated after each step with momentum ``m(step)``: constant ``momentum`` or a
    cosine from ``momentum`` to ``momentum_final`` over the run (``schedule="cosine"``)."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        predictor: nn.Module | None,
        *,
        momentum: float,
        momentum_final: float = 1.0,
        schedule: str = "constant",
    ) -> None:
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"momentum schedule must be 'constant' or 'cosine', got {schedule!r}")
        for value, name in ((momentum, "momentum"), (momentum_final, "momentum_final")):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.target_encoder = make_target(encoder)
        self.target_projector = make_target(projector)
        self.momentum, self.momentum_final, self.schedule = momentum, momentum_final, schedule
        self.step = 0  # optimizer steps taken, as the engine counts them

    def online(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.encoder(x))
        return z if self.predictor is None else self.predictor(z)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_encoder(x))

    @abc.abstractmethod
    def embed_online(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The embeddings with gradient (the surrogate pass of cached accumulation needs only
        these: the twin's outputs carry no gradient)."""

    def momentum_at(self, step: int, total: int) -> float:
        """The momentum of the update after the ``step``-th step (1-based)."""
        return scheduled_momentum(step, total, self.momentum, self.momentum_final, self.schedule)

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = self.momentum_at(step, total_steps)
        ema_update(self.target_encoder, self.encoder, m)
        ema_update(self.target_projector, self.projector, m)
        self.step = step

    def extra_state(self) -> dict:
        return {"step": self.step}

    def load_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])


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


def momentum_kwargs(cfg: Config) -> dict:
    m = cfg.method
    return {
        "momentum": m.momentum,
        "momentum_final": m.momentum_final,
        "schedule": m.momentum_schedule,
    }


def online_networks(cfg: Config) -> tuple[nn.Module, nn.Module]:
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    return encoder, build_head(encoder.out_dim, cfg.model)


def build(cfg: Config) -> MomentumMethod:
    check_loss_name(cfg, ("infonce",))
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
