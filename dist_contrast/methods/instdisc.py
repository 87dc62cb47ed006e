"""InstDisc (Wu et al. 2018): instance discrimination against a memory bank.

An encoder and a linear projection to ``model.proj_dim`` give one L2-normalised feature per
sample (one view, ``view1``). The :class:`MemoryBank` holds one row per sample index (sharded by
index across ranks); the feature of sample ``i`` is scored against its own row (the positive)
and against negatives of every rank's shard:

- ``loss.name=nce``: InstDisc's NCE with ``method.bank_negatives`` (m = 4096 in the paper)
  rows sampled per rank and step, Z estimated once on the first step and kept;
- ``loss.name=infonce``: the non-parametric softmax (cross-entropy of the positive among the
  positive and the negatives); ``method.bank_negatives=0`` takes the whole bank, the
  paper's softmax over all n rows (the sample's own row counted once, as the positive).

``method.bank_proximal`` = lambda adds the proximal term ``lambda ||f_i - v_i||^2``. After each
step the rows of the step's samples follow ``v <- normalize(m v + (1 - m) f)`` with
``m = method.bank_momentum`` (0.5). The paper's temperature is 0.07.

The bank has ``method.bank_size`` rows. A config with 0 is resolved before the method is built
(:func:`dist_contrast.train.runs.resolve`) to the samples of every split in the ``counts.json``
beside the training shards (``dist-contrast shards`` numbers the samples of a data set 0..N-1
across train and val and stores the number in each sample's ``json``).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_contrast.config import Config
from dist_contrast.methods.base import LossOutput, Method, Pending, calls_per_step
from dist_contrast.models import MLPHead, build_encoder
from dist_contrast.negatives import MemoryBank, bank_loss, estimate_bank_z

MODES = {"nce": "nce", "infonce": "softmax"}


class InstDisc(Method):
    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        bank: MemoryBank,
        *,
        mode: str = "nce",
        temperature: float = 0.07,
        negatives: int = 4096,
        proximal: float = 0.0,
        calls: int = 1,
    ) -> None:
        super().__init__()
        if mode not in ("nce", "softmax"):
            raise ValueError(f"mode must be 'nce' or 'softmax', got {mode!r}")
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0 (0: the whole bank), got {negatives}")
        self.encoder, self.projector, self.bank = encoder, projector, bank
        self.mode, self.temperature, self.k, self.proximal = mode, temperature, negatives, proximal
        self.pending = Pending(calls)

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"f": self.projector(self.encoder(batch["view1"]))}

    def negatives(self) -> torch.Tensor:
        """This rank's negatives for this step: ``k`` sampled rows, or its whole shard."""
        return self.bank.rows if self.k == 0 else self.bank.sample_negatives(self.k)

    def loss(self, emb: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> LossOutput:
        if "index" not in batch:
            raise ValueError("method 'instdisc' needs each sample's data set index in the batch")
        f, index = emb["f"], batch["index"].to(torch.int64)
        positives = self.bank.fetch(index)
        negatives = self.negatives()
        z = None
        if self.mode == "nce":
            if float(self.bank.z) == 0.0:  # InstDisc: Z estimated once, on the first batch
                est = estimate_bank_z(f, positives, negatives, self.temperature, self.bank.n_data)
                self.bank.z.fill_(est)
            z = float(self.bank.z)
        loss = bank_loss(
            f,
            positives,
            negatives,
            self.temperature,
            mode=self.mode,
            n_data=self.bank.n_data,
            z=z,
            proximal=self.proximal,
            tile=self.bank.tile,
            whole_bank=self.k == 0,
        )
        self.pending.add(index, f)
        return LossOutput(loss)

    def on_step_end(self, step: int, total_steps: int) -> None:
        taken = self.pending.take()
        if taken:
            self.bank.update(*taken)

    def negatives_per_query(self, batch_size: int, world: int) -> int:
        return self.bank.n_data if self.k == 0 else self.k * world

    def extra_state(self) -> dict:
        return {"bank": self.bank.shard_state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.bank.load_shard_state_dict(state["bank"])

    def load_extra_state_elastic(self, states: list[dict]) -> list[str]:
        moved = self.bank.load_rerouted([state["bank"] for state in states])
        return [f"bank {self.bank.n_data:,} rows re-routed"] if moved else []


def build(cfg: Config) -> InstDisc:
    if cfg.method.bank_size < 1:
        raise ValueError(
            "method.bank_size is 0: resolve it first (dist_contrast.train.runs.resolve)"
        )
    name = cfg.loss.name  # nce or infonce (methods.registry)
    encoder = build_encoder(cfg.model, cfg.data.channels, cfg.data.image_size)
    projector = MLPHead(encoder.out_dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim, 1)
    tile = cfg.loss.tile if cfg.loss.memory_efficient else None
    bank = MemoryBank(
        cfg.method.bank_size,
        cfg.model.proj_dim,
        momentum=cfg.method.bank_momentum,
        seed=cfg.run.seed,
        tile=tile,
    )
    return InstDisc(
        encoder,
        projector,
        bank,
        mode=MODES[name],
        temperature=cfg.loss.temperature,
        negatives=cfg.method.bank_negatives,
        proximal=cfg.method.bank_proximal,
        calls=calls_per_step(cfg),
    )
