"""The typed run configuration: one dataclass tree that holds every default.

A YAML file is a small diff over it (:mod:`dist_contrast.config.parse`); value checks are in
:mod:`dist_contrast.config.validate`. Method names are not listed here: ``method.name`` is
checked against the method registry (:mod:`dist_contrast.methods.registry`), the one place a
method is declared.

Each section's class docstring and each field's docstring (the string right below the field)
are its documentation: ``docs/configs.md`` is generated from them
(:mod:`dist_contrast.config.reference`), and a test fails when a key has none. A path
``docs/NAME.md#anchor`` in a docstring becomes a link there.
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
    """The run's name, folder and seed. A run writes everything to `<run.dir>/<run.name>/`:
    `config.yaml` (the resolved tree), `metrics.jsonl`, `checkpoints/`, `eval.json`, `export/`,
    `plots/`, `wandb/` (docs/training.md#the-run-directory)."""

    name: str = "default"
    """The run's folder under `run.dir`: a plain name (not empty, no `/`)."""
    dir: str = "runs"
    """The folder of the runs: a run lives in `<dir>/<name>/`."""
    seed: int = 0
    """Seed of the initial weights (the same on every rank), of the data order and the views
    (mixed with epoch, rank and worker) and of the queues and the memory bank. A resume on
    another number of ranks needs the seed the checkpoint was saved with."""
    overwrite: bool = False
    """A run dir that holds an earlier run's work (step directories, metrics rows) is resumed
    (`checkpoint.resume`) or refused, never started over. true: start over anyway, deleting
    (and saying so) its checkpoints, metrics.jsonl, eval.json and plots; with
    `checkpoint.resume=PATH` of an older step of this run, the step directories after it
    (docs/reliability.md#runs-are-never-started-over)."""


@dataclass
class DataConfig:
    """Where the samples come from and how they are read: WebDataset shards (images, captions,
    labels; img2dataset output as it is), read, decoded and cropped in the loader workers of
    each rank (docs/data.md)."""

    train_shards: str | list[str] = "data/digits/train-*.tar"
    """The training shards: a brace pattern (`train-{000000..000009}.tar`), a glob
    (`train-*.tar`), a comma-separated list, or a list of these mixed with `data.train_weights`.
    Remote URLs (`http(s)://`, `pipe:`, `gs://`, `s3://`, `hf://`) are passed through and read
    as streams (docs/data.md#remote-shards)."""
    train_weights: list[float] = field(default_factory=list)
    """Mixing weights (> 0) of the entries of a `data.train_shards` list, one per entry: each
    sample is drawn from an entry with these odds until all are read. Empty: the entries form
    one pool."""
    val_shards: str = "data/digits/val-*.tar"
    """The validation shards of evaluation (kNN, linear probe, zero-shot), patterns as
    `data.train_shards`; checked to match files when training starts. `""`: none, and
    evaluation then refuses."""
    resampled: bool = False
    """true: shards drawn with replacement, an epoch is `data.epoch_samples` samples (global).
    false: every sample once per epoch, shards split by rank then by worker (every loader
    worker of the job needs at least one shard; `train --check` says when not)."""
    epoch_samples: int = 0
    """Resampled mode: samples per epoch over all ranks (must be > 0 there); unused otherwise."""
    num_workers: int = 1
    """Loader worker processes per rank (0: read in the training process)."""
    prefetch_factor: int = 2
    """Batches each loader worker keeps ready; more costs CPU on a small machine
    (shared-memory traffic)."""
    shuffle_buffer: int = 512
    """Samples each loader worker shuffles among (a buffer filled from its shards); 0 or 1: no
    shuffle buffer. A resume on another number of ranks needs the value the checkpoint was
    saved with."""
    image_size: int = 16
    """Input resolution in pixels (square, at least 8): crop size of the training views;
    evaluation resizes the shorter side to it and takes the centre crop."""
    channels: int = 1
    """Image channels the model sees: 1 (gray) or 3 (RGB); images are converted to it."""
    mean: list[float] = field(default_factory=lambda: [0.5])
    """Normalisation `(x - mean) / std` of pixels in [0, 1]: one value for all channels or
    one per channel; saved with an export (and an HF export's image processor)."""
    std: list[float] = field(default_factory=lambda: [0.5])
    """The std of that normalisation (each > 0): one value or one per channel."""
    require_caption: bool = False
    """Skip (and count) samples without a non-empty caption; must be true with a
    `data.tokenizer`."""
    max_image_pixels: int = 64_000_000
    """Larger images are rejected (skipped and counted) from their header, before decoding."""
    warn_every_s: float = 30.0
    """Warnings about skipped data (a corrupt sample, an unreadable shard, a huge image): at most
    one line per reason per this many seconds, with the number held back in the next."""
    remote_retries: int = 5
    """Remote shards (anything not a local file): a read that fails for a transient reason (a
    refused or reset connection, an empty reply, a transfer that breaks off) is retried up to
    this many times, from where it broke off; then the shard counts as unreadable
    (docs/data.md#remote-shards)."""
    remote_backoff_s: float = 1.0
    """The wait in seconds before the first retry of a remote read, each wait twice the last (at
    most 30 s); in [0, 3600]."""
    views: int = 2
    """Crops per image: 2 (two views: SimCLR, MoCo, BYOL, ...) or 1 (image-text methods such as
    CLIP: `view1` only)."""
    tokenizer: Literal["none", "bytes", "bpe"] = "none"
    """Captions -> token ids in the loader workers (batch key `tokens`): `bytes` (UTF-8 bytes,
    nothing to train) or `bpe` (`data.tokenizer_path`); `none` for image-only methods."""
    tokenizer_path: str = ""
    """With `data.tokenizer=bpe` (and only then): a `tokenizer.json` from `dist-contrast
    tokenizer train`."""
    context_length: int = 77
    """Token ids per caption row (CLIP's 77; at least 2): longer captions are cut, end-of-text
    kept; byte tokens keep a caption of up to 75 bytes whole."""


@dataclass
class AugmentConfig:
    """View strengths, digits-sized by default. Crops (scale, rotation, shift, flip) run per
    sample in the loader workers; the per-pixel ops (jitter, grayscale, blur, solarize, noise)
    run batched on the training device (kornia)."""

    crop_scale_min: float = 0.5
    """Random resized crop: least area fraction of the image (0 < min <= max <= 1); aspect
    ratio in [3/4, 4/3]."""
    crop_scale_max: float = 1.0
    """Random resized crop: largest area fraction of the image."""
    rotation_deg: float = 15.0
    """Crops are rotated by an angle uniform in +-this many degrees (0: none)."""
    translate: float = 0.1
    """Crops are shifted by up to this fraction of the image's width and height."""
    flip_prob: float = 0.0
    """Probability of a horizontal flip of a crop."""
    brightness: float = 0.3
    """Colour jitter: brightness strength (torchvision's/kornia's ColorJitter)."""
    contrast: float = 0.3
    """Colour jitter: contrast strength."""
    saturation: float = 0.0
    """Colour jitter: saturation strength (needs `data.channels=3`)."""
    hue: float = 0.0
    """Colour jitter: hue strength (needs `data.channels=3`)."""
    jitter_prob: float = 0.8
    """Probability of colour jitter on a view (in a random order of its four parts)."""
    grayscale_prob: float = 0.0
    """Probability of turning a view gray (needs `data.channels=3`)."""
    blur_prob: float = 0.0
    """Probability of a Gaussian blur of a view (kernel about a tenth of `data.image_size`)."""
    blur_sigma_max: float = 2.0
    """Gaussian blur: sigma drawn uniformly in [0.1, this]."""
    solarize_prob: float = 0.0
    """Probability of solarizing a view (pixels above one half inverted)."""
    noise_std: float = 0.05
    """Std of the Gaussian noise added to every view's pixels (in [0, 1] units; 0: none)."""
    small_crops: int = 0
    """Multi-crop (SwAV/DINO): this many extra small crops per image (batch key
    `small_crops`)."""
    small_size: int = 8
    """Multi-crop: the small crops' size in pixels (a ViT's patch size must divide it)."""
    small_scale_min: float = 0.1
    """Multi-crop: least area fraction of a small crop (0 < min <= max <= 1)."""
    small_scale_max: float = 0.4
    """Multi-crop: largest area fraction of a small crop."""


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
    """The image encoder, the projector and the predictor; where the weights start from."""

    encoder: ENCODER_NAMES = "resnet_tiny"
    """The image encoder: ResNets (`resnet18`, `resnet50` standard; `resnet_tiny`,
    `resnet_small` for digits) or ViT presets (`vit_nano`: 128-d, 4 blocks; `vit_tiny`,
    `vit_small`, `vit_base`)."""
    width: int = 32
    """ResNets: channels of the first stage (64 is the standard ResNet-18/50); not used by
    ViTs."""
    stem: Literal["small", "imagenet"] = "small"
    """ResNets: `small` is a 3x3 stride-1 stem without max-pool (digits, CIFAR); `imagenet` the
    7x7 stride-2 stem with max-pool."""
    norm: Literal["group", "batch", "sync_batch", "none"] = "group"
    """ResNets: `group` and `none` do not depend on the batch (ranks stay independent);
    `batch` normalises over each rank's batch (with `method.shuffle_bn=true` for MoCo v2);
    `sync_batch` over the global batch (SyncBatchNorm, CUDA only: torch refuses it on CPU).
    ViTs use LayerNorm whatever this says."""
    patch_size: int = 4
    """ViTs: patch size in pixels; must divide `data.image_size` (and `augment.small_size`)."""
    vit_width: int = 0
    """ViTs: embedding width; not 0, it replaces that of the `model.encoder` preset (`vit_nano`
    128, `vit_tiny` 192, `vit_small` 384, `vit_base` 768); `model.vit_heads` must divide it. An
    error for other encoders. Exports (native and `--format hf`) take the size from the
    model."""
    vit_depth: int = 0
    """ViTs: blocks; not 0, it replaces the preset's (`vit_nano` 4, the others 12)."""
    vit_heads: int = 0
    """ViTs: attention heads; not 0, they replace the preset's (`vit_nano` 4, `vit_tiny` 3,
    `vit_small` 6, `vit_base` 12)."""
    vit_mlp_ratio: int = 0
    """ViTs: MLP hidden / width; not 0, it replaces the preset's (4)."""
    vit_layout: Literal["timm", "clip", "siglip"] = "timm"
    """ViTs: `timm` (patch conv with bias, no norm before the blocks: transformers' `ViTModel`;
    DeiT/timm init, truncated normal 0.02), `clip` (OpenAI's CLIP image tower: patch conv
    without bias, `ln_pre`: `CLIPModel` / `CLIPVisionModel`; CLIP's init: class token and
    position embedding `width^-0.5`, blocks at PyTorch's defaults) or `siglip` (SigLIP's: no
    class token, the tokens pooled by multihead attention pooling; `SiglipModel` /
    `SiglipVisionModel`; big_vision's init). In image-text methods a `siglip` ViT has no
    projection after the pooling: `model.proj_dim` must equal its width."""
    activation: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    """MLP activation of ViT and text transformer blocks: `gelu` (exact), `quick_gelu`
    (OpenAI's CLIP) or `gelu_tanh` (the tanh approximation: SigLIP's)."""
    norm_eps: float = 1e-6
    """LayerNorm eps of ViT and text transformers (1e-6 as timm; OpenAI's CLIP and
    transformers use 1e-5)."""
    init_from: str = ""
    """Start from pretrained weights: `hf:DIR` (a transformers `CLIPModel`, `CLIPVisionModel`,
    `ViTModel` or `ResNetModel` folder), `export:DIR` (a dist-contrast export) or
    `open_clip:DIR` (an open_clip CLIP's `local-dir` folder, or its
    `open_clip_model.safetensors` / `open_clip_pytorch_model.bin` beside
    `open_clip_config.json`; a `.bin` only through `weights_only=True`). Image-text runs take
    both towers and the logit scale (and bias), vision runs the image encoder. Shapes are
    checked key by key. `""`: random initial weights."""
    lock_image: bool = False
    """Locked-image tuning (LiT, Zhai et al. 2022), image-text methods only, with
    `model.init_from`: the image tower (encoder and projection) is frozen: not in the
    optimizer, norms in eval mode, run without autograd."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them."""
    proj_hidden_dim: int = 256
    """Width of the projector's hidden layers; the InstDisc projector is one linear layer and
    has none."""
    proj_dim: int = 64
    """Width of the embedding the loss sees: the projector's output (InstDisc, image-text
    methods: the linear projection of each tower)."""
    proj_layers: int = 2
    """Linear layers of the projector (at least 1): Linear (-> norm -> ReLU -> Linear) x
    (layers - 1)."""
    proj_norm: bool = False
    """Batch norm after every hidden layer of the projector and predictor (BYOL, MoCo v3)."""
    pred_hidden_dim: int = 256
    """Hidden width of the predictor of BYOL and MoCo v3 (`proj_dim` -> this -> `proj_dim`)."""


@dataclass
class TextConfig:
    """The text tower of image-text methods (`method.name=clip`): a transformer over the caption
    tokens (`data.tokenizer`), pooled at one position (`text.layout`), then a linear projection
    to `model.proj_dim` (the image tower's encoder gets one too, but a `siglip` ViT). CLIP's
    init: attention `width^-0.5`, out-projections `width^-0.5 (2 layers)^-0.5`, MLP in
    `(2 width)^-0.5`."""

    width: int = 128
    """Embedding width of the text transformer."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Attention heads; must divide `text.width`."""
    mlp_ratio: int = 4
    """MLP hidden / width."""
    layout: Literal["clip", "siglip"] = "clip"
    """`clip`: causal attention, pooled at the end-of-text token, a projection without bias
    (CLIP's; transformers' `CLIPTextModel`). `siglip`: attention both ways over the padded
    row, pooled at its last position, a projection with a bias (SigLIP's; `SiglipTextModel`);
    the init of big_vision."""


@dataclass
class MethodConfig:
    """The training method (which networks, views and negatives) and the state it keeps across
    steps: momentum encoders, the MoCo queue, the InstDisc memory bank (docs/methods.md)."""

    name: str = "simclr"
    """A name of the method registry (`dist_contrast.methods.registry`: `simclr`, `moco_v2`,
    `clip`, ...); docs/methods.md#methods lists them with the `loss.name` each takes."""
    momentum: float = 0.99
    """Momentum (EMA) target encoder of MoCo v2/v3 and BYOL: the EMA momentum, in [0, 1] (the
    start value under `cosine`)."""
    momentum_final: float = 1.0
    """The momentum at the last step under `method.momentum_schedule=cosine`, in [0, 1]."""
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    """`cosine` goes from `method.momentum` at step 0 to `method.momentum_final` at the last
    step (BYOL, MoCo v3); `constant` keeps `method.momentum`."""
    queue_size: int = 4096
    """MoCo v2 (and CLIP with `method.queues`): negatives in all, K_total; each rank holds
    K_total / W of them, so it must be a multiple of the ranks (`train --check` checks it; a
    resume on another number of ranks keeps the nearest multiple)."""
    shuffle_bn: bool = False
    """MoCo v2 on per-rank batch norm (`model.norm=batch`): the key batch is shuffled across
    ranks before the key encoder (shuffle-BN)."""
    bank_momentum: float = 0.5
    """InstDisc: memory bank update momentum m, in [0, 1]: a row follows
    `v <- normalize(m v + (1 - m) f)` after each step."""
    bank_negatives: int = 0
    """InstDisc: bank rows each rank samples per step as negatives (shared by its queries, so
    each query sees W x this many; `loss.name=nce`: 4096 in the paper); 0: the whole bank."""
    bank_proximal: float = 0.0
    """InstDisc: lambda (>= 0) of the proximal term `lambda ||f_i - v_i||^2`."""
    bank_size: int = 0
    """InstDisc: rows of the memory bank (sample indices); 0: the samples of every split in the
    `counts.json` beside the training shards."""
    queues: bool = False
    """CLIP: momentum image and text towers and two sharded queues of `method.queue_size`
    momentum features each (ALBEF-style), so each query sees the global batch plus the
    queue."""


@dataclass
class LossConfig:
    """The objective and how its negatives are scored: gathered from all ranks or not, tiled or
    whole (docs/methods.md)."""

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
    """The objective; it must fit `method.name` (docs/methods.md#methods)."""
    temperature: float = 0.2
    """Softmax temperature (> 0); CLIP / SigLIP: the initial temperature of the learnable
    logit scale (CLIP: 0.07; SigLIP: 0.1, i.e. a logit scale of 10)."""
    gather: Literal["all", "off"] = "all"
    """`all`: each anchor is scored against the views of all ranks (gathered with gradient);
    `off`: each rank's batch only."""
    memory_efficient: bool = False
    """Tiled softmax: the B x B (or B x K) logits are never materialised whole (large
    batches); not for SigLIP."""
    tile: int = 1024
    """Tile size of the tiled softmax (rows and columns)."""
    logits: Literal["local", "full"] = "local"
    """CLIP / SigLIP: `local`: each rank scores its own rows against the gathered columns
    (O(n x N)); `full`: every rank scores the whole gathered N x N matrix (open_clip's
    local_loss=False). Same values and gradients; `memory_efficient=true` is the tiled form of
    `local` (CLIP only)."""
    max_scale: float = 100.0
    """CLIP / SigLIP: the learnable logit scale is clamped at this (> 0)."""
    init_bias: float = -10.0
    """SigLIP: initial value of the learnable logit bias."""
    margin: float = 0.05
    """Pairwise losses (method `metric`): margin of the triplet loss."""
    pos_margin: float = 0.0
    """Contrastive loss: positive pairs closer than this cost nothing."""
    neg_margin: float = 1.0
    """Contrastive loss: negative pairs farther than this cost nothing."""
    mining: Literal["all", "hard", "semihard"] = "all"
    """Triplet mining: `all`, `hard` (batch-hard) or `semihard` (FaceNet: negatives farther than
    the positive but within `loss.margin`)."""
    angle_deg: float = 40.0
    """Angular loss: the angle bound alpha in degrees."""


@dataclass
class TrainConfig:
    """The training loop: steps, batch, optimizer and schedule, guard and stops. DeepSpeed's
    micro batch is `train.batch_size` and its gradient clipping `train.grad_clip`."""

    steps: int = 200
    """Optimizer steps of the run (> 0); the LR schedule ends here."""
    batch_size: int = 128
    """Samples per rank per step (the global batch is W times this)."""
    optimizer: Literal["adamw", "sgd", "lars", "lamb"] = "adamw"
    """`adamw`, `sgd` (Nesterov momentum 0.9), `lars` (momentum 0.9) or `lamb`; `lars` and
    `lamb` need `deepspeed.zero_stage=0` and `deepspeed.precision=fp32` (their per-layer trust
    ratio needs whole fp32 parameters). No weight decay on biases and norms."""
    lr: float = 2e-3
    """Peak learning rate (> 0), reached at the end of the warmup."""
    min_lr_ratio: float = 0.01
    """The cosine decay ends at `lr` times this, in [0, 1]."""
    warmup_steps: int = 30
    """Linear warmup steps, then cosine to the last step, counted in steps taken."""
    weight_decay: float = 1e-4
    """Weight decay (>= 0) of weight matrices and kernels (biases and norm parameters get
    none): decoupled for `adamw`, added to the gradient for `sgd` and `lars`, to the update for
    `lamb`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm at this (DeepSpeed's `gradient_clipping`); 0: off."""
    log_every: int = 10
    """A row of `metrics.jsonl` (and wandb) every this many steps and at the last step; losses
    and metrics stay on the device in between."""
    stop_at: int = 0
    """Stop this invocation at this step (with a checkpoint) while the LR schedule still runs
    to `train.steps`: time-boxed jobs that a later `checkpoint.resume=latest` continues. 0: no
    stop."""
    accumulation: int = 1
    """Split each rank's batch into this many micro-batches (it must divide
    `train.batch_size`)."""
    accumulation_mode: Literal["cached", "plain"] = "cached"
    """`cached` (GradCache) keeps the negatives of the whole batch with the activation memory
    of one micro-batch; `plain` gives each micro-batch its own loss (fewer negatives)."""
    max_bad_steps: int = 5
    """NaN/inf guard: a step whose loss or gradients are not finite on any rank is skipped on
    every rank; this many skipped steps in a row stop the run with a message."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this many seconds for a peer (a hung or lost rank)
    fails the run, so a broken job ends instead of holding its nodes."""
    stop_grace_s: float = 10.0
    """A stop signal (preemption) while a rank waits for data: the wait lasts at most this many
    seconds more (a batch within it: the usual checkpoint at the end of the step; none: the
    rank leaves without one, back to the last checkpoint); well under Slurm's KillWait (30 s),
    after which SIGKILL follows."""
    compile: bool = False
    """`torch.compile` (inductor) of each block of the image and text towers (transformer
    blocks, ResNet residual blocks, momentum twins too), in place: checkpoints and exports are
    unchanged. ZeRO 0-2 (ZeRO-3 refused); docs/training.md#torchcompile."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine. Its JSON config is derived from the tree: micro batch
    `train.batch_size`, ZeRO stage, precision, gradient clipping `train.grad_clip`."""

    zero_stage: int = 2
    """ZeRO stage: 0, 1, 2 or 3."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """`fp32`, `bf16` (CPU or GPU) or `fp16` (GPU)."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed JSON keys (`deepspeed.raw.zero_optimization.overlap_comm=true`),
    deep-merged over the derived config: they win."""


@dataclass
class CheckpointConfig:
    """Checkpoints in `<run>/checkpoints/`: step directories, each with a manifest, and a
    `latest` pointer written last (docs/reliability.md#every-step-carries-a-manifest)."""

    every: int = 100
    """A checkpoint every this many steps; one is always written at the last step too."""
    resume: str = ""
    """`""` (a fresh run), `latest` (the step `latest` names, verified against its manifest; a
    damaged one is refused), `latest_intact` (the newest step that verifies; damaged newer ones
    are set aside as `step_N.damaged`: what a requeued Slurm job uses), or a path to a
    `step_*` directory."""
    keep: int = 3
    """Step directories kept; older ones are removed after `latest` moves."""


@dataclass
class EvalConfig:
    """Evaluation of the embeddings: kNN and linear probe on `data.val_shards` (trained on the
    training set's features), zero-shot and retrieval for image-text runs; at the end
    (`dist-contrast eval`, `eval.json`) and, with `eval.every`, during training. `dist-contrast
    eval --run RUN eval.key=value` overrides these keys for one evaluation."""

    every: int = 0
    """Evaluation during training every this many steps, on all ranks: the figures go to
    `metrics.jsonl` and wandb as `eval/<name>` and to `plots/eval.png`; 0: only at the end."""
    max_samples: int = 0
    """At most this many samples of each set per periodic evaluation (0: all): keeps it
    cheap."""
    feature_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Storage of embedded features: `fp32`, or `fp16` / `bf16` for large sets (half the
    memory)."""
    bank_memory_mb: float = 1024
    """A rank's features of the training set (the kNN bank, the linear probe's data) are kept
    in memory up to this many MB per tower; past it they go to an unnamed temporary file in
    `eval.spill_dir` and are read back a block at a time (8 MB for the kNN, 32 MB for the
    linear probe), so memory stops growing with the set. 0: on disk from the first row."""
    spill_dir: str = ""
    """The folder of that temporary file; `""`: the system's temp dir. Nothing is left behind
    (the file has no name and goes with the process)."""
    zeroshot_data: str = ""
    """Zero-shot on another set than `data.val_shards`: a CLIP_benchmark webdataset folder
    (`classnames.txt`, `zeroshot_classification_templates.txt`, `test/*.tar`), a folder of
    class folders, or labelled shards; its class names and templates win over
    `eval.zeroshot_classes` and `eval.zeroshot_templates`."""
    knn_k: int = 20
    """kNN probe: neighbours (cosine similarity) that vote, each with weight
    `exp(sim / eval.knn_temperature)` (InstDisc's weighted kNN)."""
    knn_temperature: float = 0.07
    """kNN probe: temperature (> 0) of the vote weights."""
    batch_size: int = 512
    """Samples per rank embedded at a time (also prompts per batch of zero-shot class
    embeddings)."""
    linear_weight_decay: float = 1e-3
    """Linear probe (multinomial logistic regression on standardised frozen features,
    full-batch L-BFGS from zero weights, deterministic): the L2 penalty
    `weight_decay / 2 ||W||^2` on the weights (not the bias), >= 0."""
    linear_max_iter: int = 200
    """Linear probe: L-BFGS iterations at most."""
    zeroshot_classes: list[str] = field(default_factory=lambda: list(DIGIT_NAMES))
    """Zero-shot (image-text runs): the class names, class i's text embedding being the mean
    over `eval.zeroshot_templates` of the normalised embeddings of its prompts. Default: the
    digits classes."""
    zeroshot_templates: list[str] = field(
        default_factory=lambda: [
            "a drawing of the number {}",
            "an image of a {}",
            "a low resolution {}",
            "handwriting showing the digit {}",
        ]
    )
    """Zero-shot prompts: `{}` is replaced by the class name. Default: templates held out from
    the digits captions."""


@dataclass
class LoggingConfig:
    """What a run reports besides `metrics.jsonl` (always written): wandb, the console progress
    bar, plots, sample keys."""

    wandb: bool = True
    """A wandb run in `<run>/wandb` (false: none); its id is kept in `<run>/wandb/run_id`, so a
    resume or requeue continues the same wandb run."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline`: `wandb sync runs/<name>/wandb/offline-run-*` uploads later; `online`: live.
    The `WANDB_MODE` environment variable wins over this (`online`, `offline`, `disabled`)."""
    wandb_project: str = "dist-contrast"
    """The wandb project of the run."""
    progress: bool = True
    """A progress bar on the console (tqdm)."""
    plots: bool = True
    """Loss and throughput PNGs in `<run>/plots/` at the end."""
    sample_keys: bool = False
    """The keys of every step's samples, per rank: `<run>/sample_keys/rank_NNNNN.jsonl`, a line
    `{"step", "keys"}` a step (which samples a step saw; what a resumed run read in all;
    docs/training.md#the-run-directory)."""


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
