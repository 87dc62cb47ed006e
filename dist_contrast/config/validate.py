"""Validation of config values (their types are already right when these run).

Each failed check is a :class:`ConfigError` naming the dotted key. Used by
:mod:`dist_contrast.config`, which re-exports :func:`validate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dist_contrast.errors import ConfigError

if TYPE_CHECKING:  # annotations only
    from dist_contrast.config.schema import AugmentConfig, Config, DataConfig, MethodConfig


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def validate(cfg: Config) -> None:
    _check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a plain name")
    _check(cfg.train.steps > 0, "train.steps", "must be > 0")
    _check(cfg.train.batch_size > 0, "train.batch_size", "must be > 0")
    _check(cfg.train.lr > 0, "train.lr", "must be > 0")
    _check(0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    _check(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 turns clipping off)")
    _check(cfg.train.log_every > 0, "train.log_every", "must be > 0")
    _check(cfg.train.accumulation > 0, "train.accumulation", "must be > 0")
    _check(
        cfg.train.batch_size % cfg.train.accumulation == 0,
        "train.accumulation",
        f"must divide train.batch_size ({cfg.train.batch_size})",
    )
    _check(
        0 <= cfg.train.stop_at <= cfg.train.steps, "train.stop_at", "must be in [0, train.steps]"
    )
    _check(cfg.train.max_bad_steps > 0, "train.max_bad_steps", "must be > 0")
    _check(cfg.train.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0")
    _check(cfg.train.stop_grace_s >= 0, "train.stop_grace_s", "must be >= 0")
    _check(
        not (cfg.train.compile and cfg.deepspeed.zero_stage == 3),
        "train.compile",
        "needs deepspeed.zero_stage 0-2 (ZeRO-3 gathers each parameter in hooks around every "
        "module's forward, which the compiled blocks would trace over)",
    )
    _check(
        cfg.train.optimizer not in ("lars", "lamb")
        or (cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"),
        "train.optimizer",
        "lars and lamb need deepspeed.zero_stage=0 and deepspeed.precision=fp32 (their per-layer "
        "trust ratio needs whole fp32 parameters, not the flat partitions of ZeRO or bf16/fp16)",
    )
    _check(cfg.loss.temperature > 0, "loss.temperature", "must be > 0")
    _check(cfg.loss.tile > 0, "loss.tile", "must be > 0")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    _check(cfg.checkpoint.every > 0, "checkpoint.every", "must be > 0")
    _check(cfg.checkpoint.keep > 0, "checkpoint.keep", "must be > 0")
    _validate_data(cfg.data)
    _validate_augment(cfg.augment, cfg.data)
    _check(cfg.model.width > 0, "model.width", "must be > 0")
    _check(cfg.model.proj_dim > 0, "model.proj_dim", "must be > 0")
    _validate_vit(cfg)
    _validate_method(cfg.method)
    _validate_image_text(cfg)
    _check(cfg.eval.knn_k > 0, "eval.knn_k", "must be > 0")
    _check(cfg.eval.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    _check(cfg.eval.linear_weight_decay >= 0, "eval.linear_weight_decay", "must be >= 0")
    _check(cfg.eval.linear_max_iter > 0, "eval.linear_max_iter", "must be > 0")
    _check(cfg.eval.every >= 0, "eval.every", "must be >= 0 (0: no evaluation during training)")
    _check(cfg.eval.max_samples >= 0, "eval.max_samples", "must be >= 0 (0: every sample)")
    _check(
        cfg.eval.bank_memory_mb >= 0, "eval.bank_memory_mb", "must be >= 0 (0: features on disk)"
    )


def _validate_vit(cfg: Config) -> None:
    """The ViT keys; width against heads is checked where the preset is known, when the model
    is sized (``dist_contrast.models.vit_size``, run by ``train --check`` too)."""
    m = cfg.model
    vit = m.encoder.startswith("vit")
    for key in ("vit_width", "vit_depth", "vit_heads", "vit_mlp_ratio"):
        value = getattr(m, key)
        _check(value >= 0, f"model.{key}", "must be >= 0 (0: the preset of model.encoder)")
        _check(
            vit or value == 0,
            f"model.{key}",
            f"applies to ViT encoders only (model.encoder={m.encoder}); leave it 0",
        )
    if m.vit_width and m.vit_heads:
        _check(
            m.vit_width % m.vit_heads == 0,
            "model.vit_heads",
            f"({m.vit_heads}) must divide model.vit_width ({m.vit_width})",
        )
    _validate_patch_size(cfg)


def _validate_patch_size(cfg: Config) -> None:
    if not cfg.model.encoder.startswith("vit"):
        return
    p = cfg.model.patch_size
    _check(p > 0, "model.patch_size", "must be > 0")
    _check(
        cfg.data.image_size % p == 0,
        "model.patch_size",
        f"({p}) must divide data.image_size ({cfg.data.image_size}) for a ViT encoder",
    )
    _check(
        cfg.augment.small_crops == 0 or cfg.augment.small_size % p == 0,
        "model.patch_size",
        f"({p}) must divide augment.small_size ({cfg.augment.small_size}) for a ViT encoder",
    )


def _validate_method(m: MethodConfig) -> None:
    _check(0 <= m.momentum <= 1, "method.momentum", "must be in [0, 1]")
    _check(0 <= m.momentum_final <= 1, "method.momentum_final", "must be in [0, 1]")
    _check(m.queue_size > 0, "method.queue_size", "must be > 0")
    _check(0 <= m.bank_momentum <= 1, "method.bank_momentum", "must be in [0, 1]")
    _check(m.bank_negatives >= 0, "method.bank_negatives", "must be >= 0 (0: the whole bank)")
    _check(m.bank_proximal >= 0, "method.bank_proximal", "must be >= 0")
    _check(m.bank_size >= 0, "method.bank_size", "must be >= 0 (0: from counts.json)")


def _validate_image_text(cfg: Config) -> None:
    d, t, loss = cfg.data, cfg.text, cfg.loss
    _check(d.views in (1, 2), "data.views", "must be 1 or 2")
    _check(d.context_length >= 2, "data.context_length", "must be >= 2 (start and end of text)")
    _check(
        (d.tokenizer == "bpe") == bool(d.tokenizer_path),
        "data.tokenizer_path",
        "must be set for data.tokenizer=bpe (a tokenizer.json) and only then",
    )
    for key in ("width", "layers", "heads", "mlp_ratio"):
        _check(getattr(t, key) > 0, f"text.{key}", "must be > 0")
    _check(t.width % t.heads == 0, "text.heads", f"must divide text.width ({t.width})")
    _check(loss.max_scale > 0, "loss.max_scale", "must be > 0")
    _check(
        d.tokenizer == "none" or d.require_caption,
        "data.require_caption",
        "must be true with a data.tokenizer (every sample of a batch needs a caption to tokenize)",
    )
    # Which method a loss goes with, and the tokenizer of image-text methods: the method
    # registry checks them (dist_contrast.methods.registry.check).
    if loss.name not in ("clip", "siglip"):
        return
    _check(
        not (loss.name == "siglip" and loss.memory_efficient),
        "loss.memory_efficient",
        "is not available for siglip (tiled softmax is for clip)",
    )
    _check(
        not (loss.logits == "full" and loss.memory_efficient),
        "loss.logits",
        "full cannot be tiled: memory_efficient=true is the tiled form of logits=local",
    )
    _check(
        not (cfg.method.queues and loss.name == "siglip"),
        "method.queues",
        "momentum queues go with loss.name=clip (a softmax over the queue)",
    )
    _check(
        not (cfg.method.queues and loss.gather == "off"),
        "loss.gather",
        "must be all with method.queues (the queue form scores against the gathered batch)",
    )
    _check(
        not (cfg.method.queues and loss.logits == "full"),
        "loss.logits",
        "must be local with method.queues (the momentum keys carry no gradient: each rank "
        "scores its own queries)",
    )


def _validate_data(d: DataConfig) -> None:
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _check(d.image_size >= 8, "data.image_size", "must be >= 8")
    _check(d.channels in (1, 3), "data.channels", "must be 1 or 3")
    for key in ("mean", "std"):
        values = getattr(d, key)
        _check(len(values) in (1, d.channels), f"data.{key}", "needs 1 or `channels` values")
    _check(all(s > 0 for s in d.std), "data.std", "must be > 0")
    _check(d.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
    _check(d.remote_retries >= 0, "data.remote_retries", "must be >= 0")
    _check(0 <= d.remote_backoff_s <= 3600, "data.remote_backoff_s", "must be in [0, 3600] seconds")
    _check(d.epoch_samples >= 0, "data.epoch_samples", "must be >= 0")
    _check(
        not d.resampled or d.epoch_samples > 0,
        "data.epoch_samples",
        "must be > 0 in resampled mode (the length of an epoch in samples)",
    )
    if d.train_weights:
        n = len(d.train_shards) if isinstance(d.train_shards, list) else 1
        _check(
            len(d.train_weights) == n,
            "data.train_weights",
            f"needs one weight per entry of data.train_shards ({n})",
        )
        _check(all(w > 0 for w in d.train_weights), "data.train_weights", "must all be > 0")


def _validate_augment(a: AugmentConfig, d: DataConfig) -> None:
    _check(
        0 < a.crop_scale_min <= a.crop_scale_max <= 1,
        "augment.crop_scale_min",
        "must satisfy 0 < crop_scale_min <= crop_scale_max <= 1",
    )
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        _check(0 <= getattr(a, key) <= 1, f"augment.{key}", "must be a probability in [0, 1]")
    _check(a.small_crops >= 0, "augment.small_crops", "must be >= 0")
    _check(
        0 < a.small_scale_min <= a.small_scale_max <= 1,
        "augment.small_scale_min",
        "must satisfy 0 < small_scale_min <= small_scale_max <= 1",
    )
    _check(
        d.channels == 3 or (a.saturation == 0 and a.hue == 0 and a.grayscale_prob == 0),
        "augment.saturation",
        "saturation, hue and grayscale need data.channels=3",
    )
