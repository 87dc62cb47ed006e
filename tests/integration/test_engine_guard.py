"""The NaN/inf guard on 2 gloo ranks under DeepSpeed (ZeRO-2 fp32, ZeRO-3 bf16): a loss that is
NaN on rank 1 only makes both ranks skip that step (weights, optimizer state and LR schedule
untouched, the same on both ranks), and max_bad_steps such steps in a row stop the run on every
rank with DivergedError."""

import pytest
import torch

from dist_contrast.data.loader import train_loader
from dist_contrast.errors import DivergedError, UserError
from dist_contrast.methods import LossOutput, build_method
from dist_contrast.methods.simclr import SimCLR
from dist_contrast.train.engine import Trainer
from dist_contrast.train.metrics import MetricsLogger
from dist_contrast.train.setup import wrap

from conftest import config_from_dict
from multiproc import run_ranks


class InfGradient(torch.autograd.Function):
    """0 in the forward, inf as the gradient of its input in the backward: a finite loss whose
    gradient is not (as a norm's backward at 0 or an overflowing activation make one)."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class PoisonedSimCLR(SimCLR):
    """SimCLR whose loss (``where="loss"``) or one of whose embeddings (``"embeddings"``: a
    NaN in one row of z1, before the loss gathers it) is NaN at the given calls (0-based) of
    ``loss``; or (``"grad"``) whose loss stays finite while the gradient of one parameter of
    the projector is inf."""

    def __init__(self, base: SimCLR, bad_calls: set[int], where: str = "loss") -> None:
        super().__init__(base.encoder, base.projector, base.criterion)
        self.bad_calls, self.calls, self.where = bad_calls, 0, where

    def loss(self, emb, batch):
        bad, self.calls = self.calls in self.bad_calls, self.calls + 1
        if bad and self.where == "embeddings":
            poison = torch.zeros_like(emb["z1"])
            poison[0, 0] = float("nan")
            emb = {**emb, "z1": emb["z1"] + poison}
        out = super().loss(emb, batch)
        if bad and self.where == "loss":
            return LossOutput(out.loss * float("nan"), out.metrics)
        if bad and self.where == "grad":
            weight = next(self.projector.parameters())
            return LossOutput(out.loss + InfGradient.apply(weight.sum()), out.metrics)
        return out


def _cfg(digits, run_dir, stage, precision, **train):
    return config_from_dict(
        {
            "run": {"dir": str(run_dir), "name": f"z{stage}{precision}"},
            "data": {"train_shards": f"{digits}/train-*.tar", "num_workers": 0},
            "model": {"width": 4, "proj_hidden_dim": 16, "proj_dim": 8},
            "train": {"batch_size": 8, "steps": 10, "warmup_steps": 2, **train},
            "deepspeed": {"zero_stage": stage, "precision": precision},
            "logging": {"wandb": False, "progress": False, "plots": False},
        }
    )


def _trainer(cfg, rank, world, bad_calls, where="loss"):
    torch.manual_seed(cfg.run.seed)
    method = PoisonedSimCLR(build_method(cfg), bad_calls if rank == 1 else set(), where)
    engine, _, scheduler = wrap(method, cfg, world)
    loader = train_loader(cfg.data, cfg.augment, cfg.train.batch_size, 0, rank, world)
    return Trainer(cfg, engine, scheduler, loader, rank, world)


def _weights(trainer, stage):
    params = list(trainer.engine.module.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().float().flatten().clone() for p in params])
    return torch.cat([p.detach().float().flatten().clone() for p in params])


def _skip_one(rank, world, digits, run_dir, stage, precision, where):
    """Run A: batches b0, b1, b2 (NaN on rank 1), b3. Run B: b0, b1, b3. Weights after each
    step of A, and after B."""
    cfg = _cfg(digits, run_dir, stage, precision)
    a = _trainer(cfg, rank, world, {2}, where)
    batches = iter(a.loader)
    views = [a.augment_batch(next(batches)) for _ in range(4)]
    trace, taken = [_weights(a, stage)], []
    for v in views:
        taken.append(a.train_step(v)[1])
        trace.append(_weights(a, stage))
    lr_steps, skipped = a.scheduler.last_epoch, a.guard.skipped_steps
    b = _trainer(cfg, rank, world, set())
    for v in (views[0], views[1], views[3]):
        b.train_step(v)
    return trace, taken, lr_steps, skipped, _weights(b, stage)


@pytest.mark.parametrize(
    "stage,precision,where",
    [
        (2, "fp32", "loss"),
        (2, "fp32", "embeddings"),
        (3, "bf16", "loss"),
        (3, "bf16", "embeddings"),
        (0, "fp32", "grad"),
        (3, "bf16", "grad"),
    ],
)
def test_nan_on_one_rank_skips_the_step_on_every_rank(
    digits_dir, tmp_path, stage, precision, where
):
    """A NaN loss, a NaN embedding that the loss gathers (it used to raise on
    rank 1 alone), or an inf gradient under a finite loss, at step 3 of rank 1: both ranks skip
    that step and go on."""
    args = (str(digits_dir), tmp_path, stage, precision, where)
    results = run_ranks(_skip_one, 2, *args, timeout=300)
    for trace, taken, lr_steps, skipped, straight in results:
        assert taken == [True, True, False, True]
        assert not torch.equal(trace[1], trace[2])  # step 2 moved the weights
        assert torch.equal(trace[2], trace[3])  # the NaN step left them alone
        assert not torch.equal(trace[3], trace[4])
        assert lr_steps == 3 and skipped == 1  # the LR schedule did not advance on the skip
        # Optimizer state untouched too: b0, b1, NaN, b3 ends where b0, b1, b3 ends.
        assert torch.equal(trace[4], straight)
    (t0, *_), (t1, *_) = results
    assert all(torch.equal(x, y) for x, y in zip(t0, t1, strict=True))  # the same on both ranks


def _diverge(rank, world, digits, run_dir):
    cfg = _cfg(digits, run_dir, 2, "fp32", max_bad_steps=3)
    trainer = _trainer(cfg, rank, world, {2, 3, 4, 5, 6, 7, 8, 9})
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.logger = MetricsLogger(cfg.run_dir, cfg, 0, enabled=rank == 0)
    try:
        trainer.run()
    except DivergedError as exc:
        return str(exc), trainer.step
    finally:
        trainer.logger.close()
    return None, trainer.step


def test_bad_steps_in_a_row_stop_every_rank(digits_dir, tmp_path):
    results = run_ranks(_diverge, 2, str(digits_dir), tmp_path, timeout=300)
    for message, step in results:
        assert message is not None and step == 4  # steps 3, 4 and 5 (1-based) were bad
        assert "stopped at step 5: 3 steps in a row had a non-finite loss" in message
    assert issubclass(DivergedError, UserError)  # the CLI prints it as one line, exit 2


def test_fp16_without_cuda_is_refused(digits_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    from dist_contrast.errors import ConfigError
    from dist_contrast.train.setup import prepare

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        prepare(_cfg(digits_dir, tmp_path, 2, "fp16"))
