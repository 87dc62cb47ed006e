"""The typed run configuration: one dataclass tree that holds every default.

A YAML file is a small diff over it (:mod:`dist_contrast.config.parse`); value checks are in
:mod:`dist_contrast.config.validate`. Method names are not listed here: ``method.name`` is
checked against the method registry (:mod:`dist_contrast.methods.registry`), the one place a
method is declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The class names of the built-in digits set (``dist-contrast shards digits``), the default data
# set of every config: its shards are captioned with them and zero-shot evaluation prompts them.
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"  # runs live in <dir>/<name>/
    seed: int = 0
    # A run dir that holds an earlier run's work (step directories, metrics rows) is resumed
    # or refused, never started over. true: start over anyway, deleting its checkpoints,
    # metrics.jsonl, eval.json and plots (with checkpoint.resume=PATH of an older step of this
    # run: the step directories after it).
    overwrite: bool = False


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
    # Remote shards (anything not a local file): a read that fails for a transient reason (a
    # refused or reset connection, an empty reply, a transfer that breaks off) is retried up to
    # `remote_retries` times, from where it broke off, the first after `remote_backoff_s`
    # seconds, each wait twice the last (at most 30 s); then the shard counts as unreadable.
    remote_retries: int = 5
    remote_backoff_s: float = 1.0
    # Crops per image: 2 (two views, SimCLR/MoCo/BYOL...) or 1 (image-text methods: view1 only).
    views: int = 2
    # Captions -> token ids in the loader workers (batch key "tokens"): "none", "bytes" (UTF-8
    # bytes, nothing to train) or "bpe" (`tokenizer_path`: a tokenizer.json from
    # `dist-contrast tokenizer train`). Rows of `context_length` ids, end-of-text kept.
    tokenizer: Literal["none", "bytes", "bpe"] = "none"
    tokenizer_path: str = ""
    context_length: int = 77  # CLIP's; byte tokens: a caption of up to 75 bytes is kept whole


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
    "resnet_tiny",
    "resnet_small",
    "resnet18",
    "resnet50",
    "vit_nano",
    "vit_tiny",
    "vit_small",
    "vit_base",
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
    # ViTs: embedding width, blocks, attention heads and MLP hidden / width of the model.encoder
    # preset (vit_nano: 128, 4, 4, 4); each one not 0 replaces the preset's. Heads divide width.
    vit_width: int = 0
    vit_depth: int = 0
    vit_heads: int = 0
    vit_mlp_ratio: int = 0
    # ViTs: "timm" (patch conv with bias, no norm before the blocks: transformers' ViTModel) or
    # "clip" (OpenAI's CLIP image tower: patch conv without bias, ln_pre; CLIPVisionModel).
    vit_layout: Literal["timm", "clip"] = "timm"
    # MLP activation of ViT and text transformer blocks: "gelu" (exact) or "quick_gelu" (CLIP).
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    # LayerNorm eps of ViT and text transformers (1e-6 as timm; OpenAI's CLIP uses 1e-5)
    norm_eps: float = 1e-6
    # Start from pretrained weights: "hf:DIR" (a transformers CLIPModel, CLIPVisionModel or
    # ViTModel folder) or "export:DIR" (a dist-contrast export). Image-text runs take both towers
    # and the logit scale, vision runs the image encoder. Shapes must match (checked).
    init_from: str = ""
    # Locked-image tuning (LiT, Zhai et al. 2022): the image tower (encoder and projection) is
    # frozen: not in the optimizer, norms in eval mode, run without autograd.
    lock_image: bool = False
    activation_checkpointing: bool = False  # recompute block activations in the backward
    proj_hidden_dim: int = 256
    proj_dim: int = 64
    proj_layers: int = 2  # projector: Linear (-> norm -> ReLU -> Linear) x (layers - 1)
    proj_norm: bool = False  # batch norm inside the projector/predictor (BYOL, MoCo v3)
    pred_hidden_dim: int = 256  # predictor of BYOL / MoCo v3


@dataclass
class TextConfig:
    """The text tower of image-text methods (method.name=clip): a causal transformer over the
    caption tokens (data.tokenizer), pooled at the end-of-text token, then a linear projection
    to model.proj_dim (the image tower's encoder gets one too)."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4


@dataclass
class MethodConfig:
    name: str = "simclr"  # a name of the method registry (dist_contrast.methods.registry)
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
    # CLIP: momentum image and text towers and two sharded queues of `queue_size` momentum
    # features each (ALBEF-style), so each query sees the global batch plus the queue.
    queues: bool = False


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
        "clip",
        "siglip",
    ] = "ntxent"
    temperature: float = 0.2
    # "all": negatives gathered from every rank (with gradient); "off": this rank's batch only.
    gather: Literal["all", "off"] = "all"
    # Tiled softmax: the B x B logits are never materialised whole (large batches).
    memory_efficient: bool = False
    tile: int = 1024
    # CLIP / SigLIP. `temperature` is the initial temperature (CLIP: 0.07; SigLIP: 0.1, i.e. a
    # logit scale of 10); the learnable logit scale is clamped at `max_scale`. "local": each
    # rank scores its own rows against the gathered columns (O(n x N)); "full": every rank
    # scores the whole gathered N x N matrix (open_clip's local_loss=False). Same values and
    # gradients; memory_efficient=true is the tiled form of "local" (CLIP only).
    logits: Literal["local", "full"] = "local"
    max_scale: float = 100.0
    init_bias: float = -10.0  # SigLIP's learnable logit bias, initial value
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
    # A collective that waits longer than this for a peer (a hung or lost rank) fails the run,
    # so a broken job ends instead of holding its nodes.
    collective_timeout_s: float = 600.0
    # A stop signal (preemption) while a rank waits for data: the wait lasts at most this much
    # more, then the rank leaves without a checkpoint (the steps since the last one are lost);
    # well under Slurm's KillWait (30 s), after which SIGKILL follows.
    stop_grace_s: float = 10.0
    # torch.compile (inductor) of each block of the image and text towers (transformer blocks,
    # ResNet residual blocks), in place: checkpoints and exports are unchanged. ZeRO 0-2.
    compile: bool = False


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Raw DeepSpeed keys, deep-merged over the derived config (they win).
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; a checkpoint is always written at the last step too
    # "" (a fresh run), "latest" (the step `latest` names, verified against its manifest; a
    # damaged one is refused), "latest_intact" (the newest step that verifies; damaged newer
    # ones are set aside as step_N.damaged: what a requeued Slurm job uses), or a path to a
    # step directory.
    resume: str = ""
    keep: int = 3  # step directories kept; older ones are removed after `latest` moves


@dataclass
class EvalConfig:
    # Evaluation during training: every this many steps, on all ranks, the figures of
    # `dist-contrast eval` (kNN, linear probe; zero-shot and retrieval for image-text runs) go to
    # metrics.jsonl and wandb as eval/<name>; 0: only at the end (`dist-contrast eval`).
    every: int = 0
    # At most this many samples of each set per periodic evaluation (0: all): keeps it cheap.
    max_samples: int = 0
    # Storage of embedded features: fp32, or fp16 / bf16 for large sets (half the memory).
    feature_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # A rank's features of the training set (the kNN bank, the linear probe's data) are kept in
    # memory up to this many MB per tower; past it they go to an unnamed temporary file in
    # `spill_dir` (default: the system's temp dir, gone with the process) and are read back a
    # block at a time, so memory no longer grows with the set. 0: on disk from the first row.
    bank_memory_mb: float = 1024
    spill_dir: str = ""
    # Zero-shot on another set than data.val_shards: a CLIP_benchmark webdataset folder
    # (classnames.txt, zeroshot_classification_templates.txt, test/*.tar), a folder of class
    # folders, or labelled shards; its class names and templates win over the lists below.
    zeroshot_data: str = ""
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 512
    # Linear probe: multinomial logistic regression on standardised frozen features,
    # full-batch L-BFGS from zero weights (deterministic), L2 penalty on the weights.
    linear_weight_decay: float = 1e-3
    linear_max_iter: int = 200
    # Zero-shot (image-text runs): class i's text embedding is the mean over `zeroshot_templates`
    # ("{}" is replaced by the class name) of the normalised embeddings of the prompts. The
    # defaults are the digits classes and templates held out from the digits captions.
    zeroshot_classes: list[str] = field(default_factory=lambda: list(DIGIT_NAMES))
    zeroshot_templates: list[str] = field(
        default_factory=lambda: [
            "a drawing of the number {}",
            "an image of a {}",
            "a low resolution {}",
            "handwriting showing the digit {}",
        ]
    )


@dataclass
class LoggingConfig:
    wandb: bool = True  # a wandb run in <run>/wandb (false: none)
    # offline: `wandb sync runs/<name>/wandb/offline-run-*` uploads later; online: live. The
    # WANDB_MODE environment variable wins over this (online, offline, disabled).
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "dist-contrast"
    progress: bool = True
    plots: bool = True  # loss and throughput PNGs in <run>/plots/ at the end
    # The keys of every step's samples, per rank: <run>/sample_keys/rank_NNNNN.jsonl, a line
    # {"step", "keys"} a step (which samples a step saw; what a resumed run read in all)
    sample_keys: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
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
