"""What happens before the loop: every check a user can fail, made before any process group
starts (:func:`prepare`, also ``train --check``), the start-over a user asked for, the method
at its starting weights, and the DeepSpeed wrap with its config and LR schedule."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from dist_contrast import distributed
from dist_contrast.config import Config, TrainConfig
from dist_contrast.data.shards import resolve_shards
from dist_contrast.data.sources import build_sources, check_readers
from dist_contrast.data.tokenizer import tokenizer_for
from dist_contrast.errors import ConfigError, DataError
from dist_contrast.methods import Method, build_method, init, registry
from dist_contrast.models import compile_blocks, vit_size
from dist_contrast.train import checkpoint, deepspeed_api, elastic, integrity
from dist_contrast.train.optim import build_optimizer
from dist_contrast.train.runs import check_method_data, check_run_dir, clear_for_overwrite, resolve


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


def wrap(method: Method, cfg: Config, world: int):
    """DeepSpeed around the method: optimizer, ZeRO stage and precision. The LR schedule stays
    with the trainer, which steps it only after a step that was taken (see guard.py).
    ``train.compile``: the towers' blocks are compiled first, in place (:func:`compile_blocks`)."""
    import deepspeed

    if cfg.train.compile:
        compile_blocks(method)
    optimizer = build_optimizer(method, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train))
    deepspeed_api.drop_stale_groups()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=method,
        optimizer=optimizer,
        config=deepspeed_config(cfg, world),
        dist_init_required=False,
    )
    deepspeed_api.keep_flat_buffer(engine)
    deepspeed_api.gather_by_broadcast_on_gloo()
    return engine, optimizer, scheduler


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the run config; ``deepspeed.raw`` wins."""
    prec = cfg.deepspeed.precision
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // cfg.train.accumulation,
        "gradient_accumulation_steps": cfg.train.accumulation,
        "train_batch_size": cfg.train.batch_size * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 16},
        # The optimizer is built by us (torch AdamW/SGD) and handed to DeepSpeed.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed.raw)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def prepare(cfg: Config, world: int | None = None, thorough: bool = False) -> int:
    """Everything a user can get wrong, checked before any process group starts, for a job of
    ``world`` ranks (default: the launcher's environment); returns ``world``. ``thorough``
    (``train --check``): the checkpoint to resume is hashed against its manifest too (the ranks
    of a run share that work when it starts)."""
    if world is None:
        world = distributed.detect_env().world_size
    if world < 1:
        raise ConfigError(f"--world must be at least 1, got {world}")
    if cfg.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "deepspeed.precision=fp16 needs a CUDA device (DeepSpeed's fp16 loss scaling); "
            "use deepspeed.precision=bf16 or fp32 on this machine"
        )
    d = cfg.data
    sources = build_sources(d.train_shards, d.train_weights, "data.train_shards")
    check_readers(sources, world, d.num_workers, d.resampled, "data.train_shards")
    if d.val_shards:  # evaluation reads them after training: a typo fails now, not then
        try:
            resolve_shards(d.val_shards, "data.val_shards")
        except DataError as exc:
            raise DataError(f"{exc} (data.val_shards='' trains without them)") from None
    check_method_data(cfg, sources)
    m = cfg.model
    if m.encoder.startswith("vit"):  # the ViT keys against the preset (width vs heads)
        vit_size(m.encoder, m.vit_width, m.vit_depth, m.vit_heads, m.vit_mlp_ratio)
    resolve(cfg)
    tokenizer_for(cfg.data)  # a missing or broken tokenizer.json: one line, before any rank
    deepspeed_api.check_version()
    deepspeed_api.check_config(deepspeed_config(cfg, world), world)
    check_run_dir(cfg, probe_lock=distributed.detect_env().rank == 0)
    root = cfg.run_dir / "checkpoints"
    step_dir = integrity.resolve_resume(root, cfg.checkpoint.resume, full=thorough)
    if step_dir is not None:
        checkpoint.check_world(step_dir, world)
        fitted = elastic.fit_queue_size(cfg, step_dir, world)
        if fitted and distributed.detect_env().rank == 0:
            print(f"dist-contrast: {fitted}", file=sys.stderr)
    elif cfg.model.init_from:  # the weights fit the model (keys, shapes, activation, eps)
        init.apply(build_method(cfg), cfg)
    registry.check_world(cfg, world)  # after fit_queue_size, which fits a resumed run's queue
    return world


def start_over(cfg: Config) -> None:
    """``run.overwrite=true``: what the earlier run left is deleted (rank 0), and said."""
    resume_from = integrity.resolve_resume(cfg.run_dir / "checkpoints", cfg.checkpoint.resume)
    gone = clear_for_overwrite(cfg, resume_from)
    if gone:
        shown = ", ".join(gone[:6]) + (f" and {len(gone) - 6} more" if len(gone) > 6 else "")
        print(f"dist-contrast: run.overwrite: deleted {shown} of {cfg.run_dir}", file=sys.stderr)


def initial_method(cfg: Config) -> Method:
    """The method at the weights training starts from: fresh (the seed's), or loaded from
    ``model.init_from`` when the run does not resume a checkpoint (whose weights win)."""
    method = build_method(cfg)
    resuming = integrity.resolve_resume(cfg.run_dir / "checkpoints", cfg.checkpoint.resume)
    if cfg.model.init_from and resuming is None:
        line = init.apply(method, cfg)
        if distributed.is_main():
            print(f"dist-contrast: {line}", file=sys.stderr)
    return method
