"""The trainer: DeepSpeed wrap and one training loop you can read top to bottom.

The engine knows a method only through ``method(batch) -> LossOutput``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from dist_contrast import checkpoint, distributed
from dist_contrast.config import Config, TrainConfig, deepspeed_config, save_config
from dist_contrast.data.pipeline import train_batches
from dist_contrast.data.shards import resolve_shards
from dist_contrast.errors import CheckpointError
from dist_contrast.methods import Method, build_method
from dist_contrast.metrics import MetricsLogger

# DeepSpeed's ZeRO-2 calls a collective that torch now marks deprecated; it is not ours to fix.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")

PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_run_dir(cfg: Config) -> None:
    """Refuse a run dir that cannot be used, before any process group starts."""
    run_dir = cfg.run_dir
    for path in (Path(cfg.run.dir), run_dir):
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"run dir '{path}' exists and is a file")
    if cfg.checkpoint.resume == "" and checkpoint.step_dirs(run_dir / "checkpoints"):
        raise CheckpointError(
            f"run dir '{run_dir}' already holds checkpoints: continue it with "
            f"checkpoint.resume=latest, or start another with run.name=NEW_NAME"
        )


def warmup_cosine(train: TrainConfig) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (every parameter with ndim <= 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=train.lr, momentum=0.9, nesterov=True)


def wrap(method: Method, cfg: Config, world: int):
    """DeepSpeed around the method: optimizer, LR schedule, ZeRO stage and precision."""
    import deepspeed

    optimizer = build_optimizer(method, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=method,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    return {
        k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
        for k, v in batch.items()
    }


def prepare(cfg: Config) -> list[str]:
    """Everything a user can get wrong, checked before any process group starts."""
    urls = resolve_shards(cfg.data.train_shards, "data.train_shards")
    check_run_dir(cfg)
    checkpoint.resolve_resume(cfg.run_dir / "checkpoints", cfg.checkpoint.resume)
    return urls


def train(cfg: Config) -> Path:
    """Train ``cfg`` on every rank of the job; return the run directory."""
    urls = prepare(cfg)
    env = distributed.init()
    try:
        return _train(cfg, urls, env)
    finally:
        distributed.shutdown()


def _train(cfg: Config, urls: list[str], env: distributed.DistEnv) -> Path:
    run_dir, main = cfg.run_dir, distributed.is_main()
    ckpt_root = run_dir / "checkpoints"
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier()

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    method = build_method(cfg)
    engine, optimizer, scheduler = wrap(method, cfg, env.world_size)
    start = 0
    resume_dir = checkpoint.resolve_resume(ckpt_root, cfg.checkpoint.resume)
    if resume_dir is not None:
        start = checkpoint.load(engine, resume_dir)

    # Data order continues from a new seed after a resume (exact data resume is not yet kept).
    batches = train_batches(
        urls,
        cfg.data,
        cfg.augment,
        cfg.train.batch_size,
        seed=cfg.run.seed + 7919 * start,
        rank=env.rank,
        world=env.world_size,
    )
    logger = MetricsLogger(run_dir, cfg, start, enabled=main)
    try:
        _loop(cfg, engine, scheduler, batches, logger, start, env.world_size)
    finally:
        logger.close()
    return run_dir


def _loop(
    cfg: Config, engine, scheduler, batches: Iterator, logger: MetricsLogger, start: int, world: int
) -> None:
    dev, dtype = distributed.device(), PRECISION[cfg.deepspeed.precision]
    method: Method = engine.module
    loss_sum, n_loss, data_wait = 0.0, 0, 0.0
    t_last, last_logged = time.perf_counter(), start
    ckpt_root = cfg.run_dir / "checkpoints"
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        batch = to_device(next(batches), dev, dtype)
        data_wait += time.perf_counter() - t0

        out = engine(batch)
        engine.backward(out.loss)
        engine.step()

        done = step + 1
        loss_sum, n_loss = loss_sum + float(out.loss.detach()), n_loss + 1
        logger.advance()
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            elapsed = time.perf_counter() - t_last
            record = {
                "step": done,
                "loss": distributed.all_reduce_mean(loss_sum / n_loss),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_sec": cfg.train.batch_size * world * (done - last_logged) / elapsed,
                "negatives_per_query": method.negatives_per_query(cfg.train.batch_size, world),
                "data_wait_frac": distributed.all_reduce_mean(data_wait / elapsed),
                **{k: distributed.all_reduce_mean(v) for k, v in out.metrics.items()},
            }
            logger.log(record)
            loss_sum, n_loss, data_wait = 0.0, 0, 0.0
            t_last, last_logged = time.perf_counter(), done
        if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
            t_save = time.perf_counter()
            checkpoint.save(engine, ckpt_root, done, cfg.checkpoint.keep)
            t_last += time.perf_counter() - t_save  # throughput excludes checkpoint writes
