"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): image-text pretraining.

Two towers: the image encoder of ``model`` (ResNet or ViT) and a text transformer
(:mod:`dist_contrast.models.text`, ``text.layout``) over the token ids the loader makes from the
captions (``data.tokenizer``), each followed by its projection to ``model.proj_dim``
(:mod:`dist_contrast.models.towers`: linear without bias as CLIP's; SigLIP's layouts put a bias
on the text projection and none after the attention-pooled image feature).
The objective holds the learnable logit scale (and SigLIP's bias): ``loss.name`` clip or
siglip, with its negatives gathered from every rank (``loss.logits`` local or full,
``loss.memory_efficient`` for the tiled form).

``method.queues=true`` adds momentum copies of both towers and two sharded queues of their
features (as ALBEF, Li et al. 2021, keeps them): each image is scored against the texts of the
global batch (gathered, with gradient) and the K_total momentum text features of the text
queue, each text likewise against images and the image queue
(:func:`dist_contrast.negatives.queue.queue_clip_loss`), so negatives exceed the global batch.
The copies follow the online towers after each step (``method.momentum``, schedule as MoCo's)
and this rank's momentum features of the step are enqueued. Unlike ALBEF the in-batch keys
are the online features, not the momentum ones: the gathered batch gives the learning signal
from the first step, where momentum keys lag the online towers by about 1 / (1 - momentum)
steps (on a 200-step run this slowed learning to a crawl).

``model.lock_image=true`` is locked-image tuning (LiT, Zhai et al. 2022): the image tower
(encoder and projection) is frozen, its parameters out of the optimizer (``requires_grad``
off before DeepSpeed builds it), kept in eval mode (batch-norm statistics do not move) and run
under ``torch.no_grad`` (no activations kept for a backward); the text tower and the logit
scale learn. Starting weights come from ``model.init_from`` (:mod:`dist_contrast.methods.init`).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.config import Config, LossConfig
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.losses import ClipLoss, SigLipLoss
from dist_contrast.methods.base import LossOutput, Method, Pending, agreed, calls_per_step
from dist_contrast.methods.momentum import ema_update, make_target, scheduled_momentum
from dist_contrast.models import towers
from dist_contrast.models.towers import Tower
from dist_contrast.negatives import ShardedQueue
from dist_contrast.negatives.queue import queue_clip_loss, reshard_phrase


def objective(loss: LossConfig) -> ClipLoss | SigLipLoss:
    """CLIP's or SigLIP's loss module (``loss.name``) for the config: it holds the learnable
    logit scale, initialised at 1 / ``loss.temperature`` (and SigLIP's bias)."""
    if loss.name == "siglip":
        return SigLipLoss(1 / loss.temperature, loss.init_bias, loss.gather, loss.logits == "local")
    return ClipLoss(
        loss.temperature,
        loss.max_scale,
        loss.gather,
        loss.memory_efficient,
        loss.tile if loss.memory_efficient else None,
        loss.logits == "local",
    )


class MomentumQueues(nn.Module):
    """Momentum copies of both towers and the image and text queues (ALBEF); the queues are
    sharded over the running process group unless ``world`` and ``rank`` are given."""

    def __init__(
        self,
        image: Tower,
        text: Tower,
        queue_size: int,
        seed: int,
        tile,
        calls,
        *,
        world: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        dim = image.out_dim
        self.image, self.text = make_target(image), make_target(text)
        layout = {"seed": seed, "tile": tile, "world": world, "rank": rank}
        self.image_queue = ShardedQueue(dim, queue_size, **layout)
        self.text_queue = ShardedQueue(dim, queue_size, **{**layout, "seed": seed + 1})
        self.pending = Pending(calls)


class CLIP(Method):
    def __init__(
        self,
        image: Tower,
        text: Tower,
        criterion: ClipLoss | SigLipLoss,
        queues: MomentumQueues | None = None,
        *,
        momentum: float = 0.995,
        momentum_final: float = 1.0,
        schedule: str = "constant",
        tile: int | None = None,
        lock_image: bool = False,
    ) -> None:
        super().__init__()
        self.image, self.text, self.criterion, self.queues = image, text, criterion, queues
        self.lock_image = lock_image
        if lock_image:
            self.image.requires_grad_(False)
            self.image.eval()
        self.momentum, self.momentum_final, self.schedule = momentum, momentum_final, schedule
        self.tile = tile
        self.step = 0

    @property
    def encoder(self) -> nn.Module:
        """The image encoder: the representation kNN and the linear probe evaluate (a property,
        so its parameters are registered once, under ``image.encoder``)."""
        return self.image.encoder

    def logit_scale(self) -> float:
        """The scale the logits are multiplied by now (CLIP's clamped at ``max_scale``)."""
        return float(self.criterion.scale().detach())

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> joint-space features (not normalised)."""
        return self.text(ids)

    def towers(self) -> dict[str, nn.Module]:
        heads = {"image_proj": self.image.proj, "text_proj": self.text.proj}
        return {
            "image": self.image.encoder,
            "text": self.text.encoder,
            "heads": nn.ModuleDict({**heads, "criterion": self.criterion}),
        }

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        if self.lock_image:
            self.image.eval()
        return self

    def sync_targets(self) -> None:
        if self.queues is not None:
            self.queues.image.load_state_dict(self.image.state_dict())
            self.queues.text.load_state_dict(self.text.state_dict())

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.lock_image:
            return self.image(pixels)
        with torch.no_grad():
            return self.image(pixels)

    def embed_online(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": self.embed_image(batch["view1"]), "text": self.text(batch["tokens"])}

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = self.embed_online(batch)
        if self.queues is not None:
            with torch.no_grad():
                emb["image_m"] = self.queues.image(batch["view1"])
                emb["text_m"] = self.queues.text(batch["tokens"])
        return emb

    def loss(self, emb, batch) -> LossOutput:
        metrics = {"logit_scale": self.criterion.scale().detach()}  # read at log steps
        if self.queues is None:
            return LossOutput(self.criterion(emb["image"], emb["text"]), metrics)
        q = self.queues
        image_m, text_m = emb["image_m"].detach(), emb["text_m"].detach()
        loss = queue_clip_loss(
            emb["image"],
            emb["text"],
            q.image_queue.keys,
            q.text_queue.keys,
            self.criterion.scale(),
            tile=self.tile,
        )
        q.pending.add(image_m, text_m)
        return LossOutput(loss, metrics)

    def loss_parameters(self) -> list[nn.Parameter]:
        return list(self.criterion.parameters())

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step = step
        if self.queues is None:
            return
        m = scheduled_momentum(step, total_steps, self.momentum, self.momentum_final, self.schedule)
        ema_update(self.queues.image, self.image, m)
        ema_update(self.queues.text, self.text, m)
        taken = self.queues.pending.take()  # this step's momentum features (none if skipped)
        if taken:
            self.queues.image_queue.enqueue(taken[0])
            self.queues.text_queue.enqueue(taken[1])

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        in_batch = batch_size * (world if self.criterion.gather == "all" else 1) - 1
        return in_batch + (self.queues.image_queue.size if self.queues is not None else 0)

    def extra_state(self) -> dict:
        state: dict = {"step": self.step}
        if self.queues is not None:
            state["image_queue"] = self.queues.image_queue.shard_state_dict()
            state["text_queue"] = self.queues.text_queue.shard_state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.queues is not None:
            self.queues.image_queue.load_shard_state_dict(state["image_queue"])
            self.queues.text_queue.load_shard_state_dict(state["text_queue"])

    def load_extra_state_elastic(self, states: list[dict]) -> list[str]:
        self.step = int(agreed(states, "step"))
        if self.queues is None:
            return []
        q = self.queues
        old = q.image_queue.load_resharded([state["image_queue"] for state in states])
        q.text_queue.load_resharded([state["text_queue"] for state in states])
        return (
            [] if old is None else [reshard_phrase("image/text queues", old, q.image_queue.size, 2)]
        )


def build(cfg: Config) -> CLIP:
    d, loss, m = cfg.data, cfg.loss, cfg.method
    tokenizer = tokenizer_for(d)  # the config check makes it a real one
    image_encoder = towers.image_encoder(cfg)  # both encoders, then both projections: the
    text_encoder = towers.text_encoder(cfg, tokenizer.vocab_size, tokenizer.eot_id)  # RNG order
    dim = cfg.model.proj_dim
    image = Tower(image_encoder, dim, towers.image_projection(cfg, image_encoder.out_dim))
    text = Tower(text_encoder, dim, towers.text_projection(cfg, text_encoder.out_dim))
    criterion = objective(loss)
    tile = loss.tile if loss.memory_efficient else None
    queues = None
    if m.queues:
        queues = MomentumQueues(image, text, m.queue_size, cfg.run.seed, tile, calls_per_step(cfg))
    return CLIP(
        image,
        text,
        criterion,
        queues,
        momentum=m.momentum,
        momentum_final=m.momentum_final,
        schedule=m.momentum_schedule,
        tile=tile,
        lock_image=cfg.model.lock_image,
    )
