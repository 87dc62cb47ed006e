"""Typed run configuration.

One dataclass tree holds every default. A YAML file is a small diff over it, and
``section.key=value`` overrides from the command line are applied on top. Unknown keys and values
of the wrong type are errors that name the key and suggest the closest valid one. The resolved
tree is saved as ``config.yaml`` in the run directory, and the DeepSpeed JSON config is derived
from it (see :func:`deepspeed_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_contrast.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"  # runs live in <dir>/<name>/
    seed: int = 0


@dataclass
class DataConfig:
    # Brace patterns ("train-{000000..000009}.tar"), globs ("train-*.tar") and comma-separated
    # lists are accepted; remote URLs ("pipe:", "s3://", "http://") are passed through. A list
    # with `train_weights` of the same length mixes several sources with those weights.
    train_shards: str | list[str] = "data/digits/train-*.tar"
    train_weights: list[float] = field(default_factory=list)
    val_shards: str = "data/digits/val-*.tar"
    # Resampled: shards drawn with replacement, an epoch is `epoch_samples` samples (global).
    # Not resampled: every sample once per epoch, shards split by rank then by worker.
    resampled: bool = False
    epoch_samples: int = 0
    num_workers: int = 1
    # batches each worker keeps ready; more costs CPU on a small machine (shared-memory traffic)
    prefetch_factor: int = 2
    shuffle_buffer: int = 512
    image_size: int = 16
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    require_caption: bool = False  # skip (and count) samples without a non-empty caption
    max_image_pixels: int = 64_000_000  # larger images are rejected from their header
    warn_every_s: float = 30.0  # bad-data warnings: at most one line per reason per interval


@dataclass
class AugmentConfig:
    """View strengths. Crops run per sample in the loader workers; the per-pixel ops run batched
    on the training device (kornia)."""

    crop_scale_min: float = 0.5
    crop_scale_max: float = 1.0
    rotation_deg: float = 15.0
    translate: float = 0.1
    flip_prob: float = 0.0
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.0
    hue: float = 0.0
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma_max: float = 2.0
    solarize_prob: float = 0.0
    noise_std: float = 0.05
    # Multi-crop (SwAV/DINO): this many extra small crops per image, `small_size` pixels.
    small_crops: int = 0
    small_size: int = 8
    small_scale_min: float = 0.1
    small_scale_max: float = 0.4


ENCODER_NAMES = Literal[
    "resnet_tiny", "resnet_small", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"
]


@dataclass
class ModelConfig:
    encoder: ENCODER_NAMES = "resnet_tiny"
    # ResNets: channels of the first stage (64 is the standard ResNet-18/50); not used by ViTs
    width: int = 32
    # ResNets: "small" is a 3x3 stride-1 stem without max-pool (digits, CIFAR); "imagenet" is
    # the 7x7 stride-2 stem with max-pool.
    stem: Literal["small", "imagenet"] = "small"
    # "batch" normalises over each rank's batch; "sync_batch" over the global batch
    # (SyncBatchNorm, CUDA); "group" and "none" do not depend on the batch at all. ViTs use
    # LayerNorm whatever this says.
    norm: Literal["group", "batch", "sync_batch", "none"] = "group"
    patch_size: int = 4  # ViTs: must divide data.image_size (and augment.small_size)
    activation_checkpointing: bool = False  # recompute block activations in the backward
    proj_hidden_dim: int = 256
    proj_dim: int = 64
    proj_layers: int = 2  # projector: Linear (-> norm -> ReLU -> Linear) x (layers - 1)
    proj_norm: bool = False  # batch norm inside the projector/predictor (BYOL, MoCo v3)
    pred_hidden_dim: int = 256  # predictor of BYOL / MoCo v3


METHOD_NAMES = Literal[
    "simclr", "moco_v2", "moco_v3", "supcon", "byol", "instdisc", "dcl", "metric"
]


@dataclass
class MethodConfig:
    name: METHOD_NAMES = "simclr"
    # Momentum (EMA) target encoder: MoCo v2/v3, BYOL. "cosine" goes from `momentum` at step 0
    # to `momentum_final` at the last step (BYOL, MoCo v3); "constant" keeps `momentum`.
    momentum: float = 0.99
    momentum_final: float = 1.0
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    queue_size: int = 4096  # MoCo v2: negatives in all, K_total; each rank holds K_total / W
    # MoCo v2 on per-rank batch norm: the key batch is shuffled across ranks (shuffle-BN).
    shuffle_bn: bool = False
    bank_momentum: float = 0.5  # InstDisc: memory bank update momentum
    bank_negatives: int = 0  # InstDisc: negatives sampled from the bank per query; 0 = all
    bank_proximal: float = 0.0  # InstDisc: lambda of the proximal term lambda ||f_i - v_i||^2
    # InstDisc: rows of the memory bank (sample indices); 0 = from the shards' counts.json
    bank_size: int = 0


@dataclass
class LossConfig:
    name: Literal[
        "ntxent",
        "infonce",
        "supcon",
        "dcl",
        "byol",
        "nce",
        "contrastive",
        "triplet",
        "npair",
        "angular",
    ] = "ntxent"
    temperature: float = 0.2
    # "all": negatives gathered from every rank (with gradient); "off": this rank's batch only.
    gather: Literal["all", "off"] = "all"
    # Tiled softmax: the B x B logits are never materialised whole (large batches).
    memory_efficient: bool = False
    tile: int = 1024
    # Pairwise losses (method "metric"): margins, triplet mining, angular bound.
    margin: float = 0.05
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    mining: Literal["all", "hard", "semihard"] = "all"
    angle_deg: float = 40.0


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 128  # per rank
    optimizer: Literal["adamw", "sgd", "lars", "lamb"] = "adamw"
    lr: float = 2e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 30
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    log_every: int = 10
    # Stop this invocation at this step (with a checkpoint) while the LR schedule still runs to
    # `steps`: time-boxed jobs that a later `checkpoint.resume=latest` continues. 0: no stop.
    stop_at: int = 0
    # Split each rank's batch into this many micro-batches. "cached" (GradCache) keeps the
    # negatives of the whole batch with the activation memory of one micro-batch; "plain" gives
    # each micro-batch its own loss (fewer negatives).
    accumulation: int = 1
    accumulation_mode: Literal["cached", "plain"] = "cached"
    # NaN/inf guard: a step whose loss or gradients are not finite on any rank is skipped on
    # every rank; this many skipped steps in a row stop the run with a message.
    max_bad_steps: int = 5


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Raw DeepSpeed keys, deep-merged over the derived config (they win).
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; a checkpoint is always written at the last step too
    resume: str = ""  # "" (fresh run), "latest", or a path to a step directory
    keep: int = 3  # step directories kept; older ones are removed after `latest` moves


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 512
    # Linear probe: multinomial logistic regression on standardised frozen features,
    # full-batch L-BFGS from zero weights (deterministic), L2 penalty on the weights.
    linear_weight_decay: float = 1e-3
    linear_max_iter: int = 200


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline mode; `wandb sync runs/<name>/wandb/offline-run-*` uploads later
    wandb_project: str = "dist-contrast"
    progress: bool = True
    plots: bool = True  # loss and throughput PNGs in <run>/plots/ at the end


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


# --------------------------------------------------------------------------------------------
# Building a config from YAML and overrides


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML diff at ``path``, then ``section.key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(tree, key, yaml.safe_load(value) if value != "" else "")
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a config from a (possibly partial) nested dict."""
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; written to a temp file and renamed, never half-written."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return key.strip(), value.strip()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, sections included."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(valid_keys(hints[f.name], dotted + "."))
    return keys


def _unknown_key(dotted: str) -> ConfigError:
    close = difflib.get_close_matches(dotted, valid_keys(), n=1, cutoff=0.5)
    if not close:  # a typo in the section name still has a recognisable key name
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' is a section; give it a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in tree.items():
        if key not in names:
            dotted = f"{prefix}{key}"
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key
                ((leaf, value),) = value.items()
                dotted += f".{leaf}"
            raise _unknown_key(dotted)
    kwargs = {}
    for name, value in tree.items():
        tp = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, dotted + ".")
        else:
            kwargs[name] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key '{dotted}' must be {_type_name(tp)}, got {value!r}{hint}")
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(value, arm, dotted)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{dotted}' has the wrong type: got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, list):
            return [_coerce(v, item_tp, f"{dotted}[{i}]") for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key '{dotted}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


# --------------------------------------------------------------------------------------------
# Validation of values (types are already right)


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
    _validate_patch_size(cfg)
    _validate_method(cfg.method)
    _check(cfg.eval.knn_k > 0, "eval.knn_k", "must be > 0")
    _check(cfg.eval.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    _check(cfg.eval.linear_weight_decay >= 0, "eval.linear_weight_decay", "must be >= 0")
    _check(cfg.eval.linear_max_iter > 0, "eval.linear_max_iter", "must be > 0")


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


# --------------------------------------------------------------------------------------------
# DeepSpeed


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
