"""Training steps on CUDA: every method under DeepSpeed (ZeRO-0/2/3 in bf16, ZeRO-2 in fp16, in a
process group of one rank), fp16's loss scaler on a planted overflow, and the pinned,
non-blocking copy of a batch.

Each step runs as the trainer runs it (the digits loader, the device augmentation,
``Trainer.train_step``: DeepSpeed's forward, backward and step with the NaN guard). Its loss,
before the update, is the CPU fp32 loss of the same initial weights on the same batch to
``|got - want| <= 0.05 |want| + 0.02`` (the forward runs in bf16/fp16; the loss itself in fp32);
the step is taken, every weight stays finite and some move; a second step is taken too.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from gpu_device import DEVICE, MARKS, cuda_only, one_rank, reuse, to

from dist_contrast.data.loader import train_loader
from dist_contrast.methods import METHODS, LossOutput, build_method
from dist_contrast.methods.simclr import SimCLR
from dist_contrast.train.engine import Trainer, to_device
from dist_contrast.train.runs import resolve
from dist_contrast.train.setup import wrap

from conftest import config_from_dict

guard_tests = reuse("integration", "test_engine_guard")
export_tests = reuse("integration", "test_export_towers")

pytestmark = MARKS

LOSS_TOL = (0.05, 0.02)  # relative, absolute


def method_cfg(name, digits, tokenizer, run_dir, stage, precision, **sections):
    """A tiny config of method ``name`` on the digits: ResNet-tiny of width 8, 8 samples."""
    tree = {
        "run": {"dir": str(run_dir), "name": f"{name}-z{stage}-{precision}"},
        "data": {"train_shards": f"{digits}/train-*.tar", "num_workers": 0},
        "model": {"width": 8, "proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
        "text": {"width": 32, "layers": 1, "heads": 2},
        "method": {"name": name, "queue_size": 64},
        "loss": {"name": export_tests.LOSS[name]},
        "train": {"batch_size": 8, "steps": 10, "warmup_steps": 0},
        "deepspeed": {"zero_stage": stage, "precision": precision},
        "logging": {"wandb": False, "progress": False, "plots": False},
    }
    if precision == "fp16":  # one overflow lowers the scale (DeepSpeed's ZeRO default: two)
        tree["deepspeed"]["raw"] = {"fp16": {"hysteresis": 1}}
    if METHODS[name].image_text:
        tree["data"].update(
            views=1, tokenizer="bpe", tokenizer_path=str(tokenizer), require_caption=True
        )
        tree["data"]["context_length"] = 32
    for key, values in sections.items():
        tree.setdefault(key, {}).update(values)
    return resolve(config_from_dict(tree))


def trainer_for(cfg, method=None) -> Trainer:
    """The trainer of ``cfg`` on this one rank, around ``method`` (default: the config's,
    seeded)."""
    one_rank()
    if method is None:
        torch.manual_seed(cfg.run.seed)
        method = build_method(cfg)
    engine, _, scheduler = wrap(method, cfg, 1)
    loader = train_loader(cfg.data, cfg.augment, cfg.train.batch_size, cfg.run.seed, 0, 1)
    return Trainer(cfg, engine, scheduler, loader, 0, 1)


def batches(trainer: Trainer, n: int) -> list[dict]:
    """The next ``n`` batches as the trainer feeds them to the method (augmented on the
    device, floating tensors in the precision's dtype)."""
    it = iter(trainer.loader)
    try:
        return [trainer.augment_batch(next(it)) for _ in range(n)]
    finally:
        trainer.loader.close()


STEPS = [
    *[pytest.param(name, 0, "bf16", {}, id=f"{name}-z0-bf16") for name in sorted(METHODS)],
    *[pytest.param(name, 2, "bf16", {}, id=f"{name}-z2-bf16") for name in sorted(METHODS)],
    *[pytest.param(name, 3, "bf16", {}, id=f"{name}-z3-bf16") for name in sorted(METHODS)],
    *[
        pytest.param(name, 2, "fp16", {}, id=f"{name}-z2-fp16", marks=cuda_only)
        for name in sorted(METHODS)
    ],
    pytest.param("simclr", 2, "bf16", {"loss": {"memory_efficient": True}}, id="simclr-tiled"),
    pytest.param("clip", 2, "bf16", {"loss": {"memory_efficient": True}}, id="clip-tiled"),
    pytest.param(
        "clip",
        3,
        "bf16",
        {"model": {"encoder": "vit_nano", "activation_checkpointing": True}},
        id="clip-vit-checkpointing",
    ),
    pytest.param(
        "moco_v2",
        2,
        "bf16",
        {"model": {"norm": "sync_batch"}},
        id="moco_v2-sync-batch-norm",
        marks=cuda_only,
    ),
]


@pytest.mark.parametrize("name,stage,precision,sections", STEPS)
def test_one_step_of_every_method(
    name, stage, precision, sections, digits_dir, digits_tokenizer, tmp_path
):
    cfg = method_cfg(name, digits_dir, digits_tokenizer, tmp_path, stage, precision, **sections)
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    reference = copy.deepcopy(method)  # fp32, on the CPU
    trainer = trainer_for(cfg, method)
    first, second = batches(trainer, 2)
    assert all(v.device.type == DEVICE.type for v in first.values() if torch.is_tensor(v))
    if cfg.model.norm == "sync_batch":  # the CPU has no SyncBatchNorm: plain BN, one rank
        reference = build_method(
            method_cfg(name, digits_dir, digits_tokenizer, tmp_path, 0, "fp32")
        )
        reference.load_state_dict(copy.deepcopy(method).cpu().float().state_dict())
    with torch.no_grad():
        want = float(reference(to(first, "cpu", torch.float32)).loss)

    before = guard_tests._weights(trainer, stage)
    assert before.device.type == DEVICE.type
    out, taken = trainer.train_step(first)
    after = guard_tests._weights(trainer, stage)
    got = float(out.loss.detach())
    assert taken and math.isfinite(got)
    rel, ab = LOSS_TOL
    assert abs(got - want) <= rel * abs(want) + ab, (got, want)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    out, taken = trainer.train_step(second)
    assert taken and math.isfinite(float(out.loss.detach()))
    assert trainer.guard.skipped_steps == 0 and trainer.scheduler.last_epoch == 2


# --------------------------------------------------------------------------------------------
# fp16: DeepSpeed's loss scaler skips a step whose gradients overflow and lowers the scale


class Overflowing(SimCLR):
    """SimCLR whose loss is multiplied by 1e8 at the given calls of ``loss``: finite in fp32,
    its gradients overflow fp16 once the loss scale (2^16) multiplies them."""

    def __init__(self, base: SimCLR, bad_calls: set[int]) -> None:
        super().__init__(base.encoder, base.projector, base.criterion)
        self.bad_calls, self.calls = bad_calls, 0

    def loss(self, emb, batch):
        bad, self.calls = self.calls in self.bad_calls, self.calls + 1
        out = super().loss(emb, batch)
        return LossOutput(out.loss * 1e8, out.metrics) if bad else out


def loss_scale(engine) -> float:
    opt = engine.optimizer
    config = getattr(opt, "loss_scale_config", None)  # ZeRO-0's FP16_Optimizer
    return float(config.cur_scale if config is not None else opt.cur_scale)


@cuda_only
@pytest.mark.parametrize("plant", ["overflow", "nan"])
@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_loss_scaler_skips_a_planted_overflow(stage, plant, digits_dir, tmp_path):
    cfg = method_cfg("simclr", digits_dir, None, tmp_path, stage, "fp16")
    torch.manual_seed(cfg.run.seed)
    base = build_method(cfg)
    if plant == "overflow":
        method = Overflowing(base, {1})
    else:  # a NaN loss: the guard's decision, and the scaler's overflow check too
        method = guard_tests.PoisonedSimCLR(base, {1})
    trainer = trainer_for(cfg, method)
    views = batches(trainer, 3)
    scale0 = loss_scale(trainer.engine)
    assert scale0 == 2.0**16
    trace, taken, scales = [guard_tests._weights(trainer, stage)], [], []
    for v in views:
        taken.append(trainer.train_step(v)[1])
        trace.append(guard_tests._weights(trainer, stage))
        scales.append(loss_scale(trainer.engine))
    assert taken == [True, False, True]
    assert not torch.equal(trace[0], trace[1]) and not torch.equal(trace[2], trace[3])
    assert torch.equal(trace[1], trace[2])  # the skipped step left the weights alone
    assert scales == [scale0, scale0 / 2, scale0 / 2]
    assert trainer.guard.skipped_steps == 1 and trainer.scheduler.last_epoch == 2


# --------------------------------------------------------------------------------------------
# Pinned memory, non-blocking copies


def test_pinned_batch_copies_non_blocking():
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(64, 3, 32, 32, generator=g), "label": torch.arange(64)}
    if DEVICE.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
        assert all(v.is_pinned() for v in batch.values())
    batch["caption"] = ["a digit"] * 64
    out = to_device(batch, DEVICE, torch.bfloat16)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert out["view1"].device.type == DEVICE.type and out["view1"].dtype == torch.bfloat16
    assert torch.equal(out["view1"].cpu(), batch["view1"].bfloat16())
    assert out["label"].dtype == torch.int64 and torch.equal(out["label"].cpu(), batch["label"])
    assert out["caption"] is batch["caption"]
