"""What a config needs per GPU, before a job is queued: ``dist-contrast plan``.

Per GPU, for the config on W GPUs (n = ``train.batch_size`` per GPU, N = n W):

- **model states** under the config's ZeRO stage and precision: parameters, gradients,
  DeepSpeed's fp32 master copy of what this rank updates, the optimizer states (AdamW and LAMB
  two fp32 per parameter, SGD and LARS one), the momentum twins (frozen copies); the gradient
  bucket ZeRO 1-2 allocates (``reduce_bucket_size`` elements; a CPU touches only the part the
  gradients fill, a GPU's allocator holds all of it);
- **activations**, counted, not guessed: the peak of live tensor bytes over a forward, loss and
  backward of the config's method on this CPU (the profiler's allocation records), at 8 and at
  16 samples; the slope is the bytes per sample, backward transients, the momentum encoders'
  no-grad forwards and activation checkpointing included as they happen;
- **the loss**: the local logits [n, N] and their gradient (per direction of CLIP), or the
  tiles [n, tile] under ``loss.memory_efficient``; the gathered features [N, D] and gradient;
- **queues**: each rank's shard, K / W rows of D float32;
- **accumulation** (``train.accumulation``): a micro-batch's activations; cached accumulation
  keeps the whole batch's loss and its embeddings with their gradients.

Communication per step, the bytes this rank hands to collectives: the feature all-gathers and
the backward's all-reduce of the gathered gradient, the gradient reduction (all-reduce under
ZeRO 0-2, reduce-scatter under 3), the updated partitions all-gathered (ZeRO 1-3), the queues'
log-sum-exp exchange. ``dist-contrast bench plan`` checks these figures against real steps:
memory within 15% of the RSS peak, communication to the byte (counted calls). On several GPUs
what it has not counted (BYOL, SupCon, the bank, SigLIP; plain accumulation, accumulation under
ZeRO-3) is refused rather than guessed. docs/scaling.md has the tables and the limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_contrast.config import Config
from dist_contrast.errors import UserError
from dist_contrast.train.deepspeed_api import ZERO_DEFAULTS

GIB = 1024**3
STATES = {"adamw": 2, "lamb": 2, "lars": 1, "sgd": 1}  # fp32 optimizer states per parameter
HALF = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes of a parameter and of its gradient
BYTE_VOCAB = 259  # the byte tokenizer's vocabulary (data.tokenizer.ByteTokenizer)


@dataclass
class Term:
    name: str
    bytes: float
    how: str
    resident: float | None = None  # what a CPU's RSS shows, where less than ``bytes``
    kind: str = ""  # communication: the collective (all_gather, all_reduce, reduce_scatter)


def wire_bytes(term: Term | dict, world: int) -> float:
    """Bytes a rank puts on its link for a communication term under ring algorithms: an
    all-gather of s per rank (W - 1) s, an all-reduce of s 2 (W - 1) / W s, a reduce-scatter of
    s (W - 1) / W s."""
    t = term if isinstance(term, dict) else dataclasses.asdict(term)
    factor = {"all_gather": world - 1, "all_reduce": 2 * (world - 1) / world}
    factor["reduce_scatter"] = (world - 1) / world
    return t["bytes"] * factor[t["kind"]]


def zero_setting(cfg: Config, key: str) -> int:
    return int(cfg.deepspeed.raw.get("zero_optimization", {}).get(key, ZERO_DEFAULTS[key]))


@dataclass
class Model:
    """What the planner reads off the config's method, once."""

    groups: list[int]  # trainable elements per optimizer group, as DeepSpeed flattens them
    sizes: list[int]  # trainable elements per parameter tensor
    frozen: int  # elements of the momentum twins
    dim: int  # embedding width D
    per_sample: float  # activation bytes per sample (see module docstring)
    vocab_note: str = ""
    loss_params: int = 0  # trainable elements of the loss (a learnable temperature)

    @property
    def trainable(self) -> int:
        return sum(self.groups)


def model_state_terms(cfg: Config, m: Model, world: int) -> list[Term]:
    stage, half, p, w = cfg.deepspeed.zero_stage, HALF[cfg.deepspeed.precision], m.trainable, world
    states = STATES[cfg.train.optimizer]
    # DeepSpeed keeps an fp32 copy of what this rank updates: its partition under ZeRO 1-3, and
    # under bf16 at stage 0 as well (its BF16_Optimizer partitions the master weights)
    sharded = stage >= 1 or half == 2
    part = f" / W ({w})" if sharded else ""
    terms = []
    if stage == 3:
        keep = zero_setting(cfg, "stage3_param_persistence_threshold")
        whole = sum(x for x in m.sizes if x <= keep)
        live = min(p - whole, zero_setting(cfg, "stage3_max_live_parameters"))
        terms += [
            Term("parameters (partition)", half * p / w, f"{p:,} x {half} B / W"),
            Term(
                "parameters (gathered)",
                half * (whole + live),
                f"{whole:,} kept whole (<= {keep:,} each) + {live:,} live in the step",
            ),
        ]
    else:
        terms.append(Term("parameters", half * p, f"{p:,} x {half} B"))
    grads = half * p / (w if stage >= 2 else 1)
    terms.append(Term("gradients", grads, f"{p:,} x {half} B" + (" / W" if stage >= 2 else "")))
    if stage in (1, 2):
        size = zero_setting(cfg, "reduce_bucket_size")
        width = 4 if stage == 1 else half
        terms.append(
            Term(
                "gradient bucket",
                width * size,
                f"reduce_bucket_size {size:,} x {width} B (a CPU touches {min(size, p):,})",
                resident=width * min(size, p),
            )
        )
    master = 4 * p / w if sharded else 0
    terms += [
        Term("fp32 master copy", master, "4 B / param" + part if master else "none (fp32)"),
        Term("optimizer states", states * 4 * p / (w if sharded else 1), f"{states} x 4 B{part}"),
        Term("momentum twins", half * m.frozen, f"{m.frozen:,} x {half} B (not optimized)"),
    ]
    return terms


def example_batch(cfg: Config, n: int, dtype: torch.dtype = torch.float32) -> dict:
    """``n`` random samples in the config's shapes (images in ``dtype``, as the trainer casts
    them for the model)."""
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    batch = {}
    for v in range(1, d.views + 1):
        shape = (n, d.channels, d.image_size, d.image_size)
        batch[f"view{v}"] = torch.randn(shape, generator=g).to(dtype)
    if d.require_caption:
        ids = torch.randint(3, BYTE_VOCAB, (n, d.context_length), generator=g)
        ids[:, -1] = 2
        batch["tokens"] = ids
    batch["label"] = torch.arange(n) % 4
    return batch


def step_peak_bytes(method: torch.nn.Module, batch: dict) -> int:
    """The peak of live tensor bytes over one forward, loss and backward of ``batch`` on the
    CPU, above what was live before (the analogue of ``torch.cuda.max_memory_allocated``):
    saved activations, the backward's transients, the no-grad forwards of momentum encoders,
    the loss, the parameter gradients. Counted from the profiler's allocation records (every
    allocation and free, in order), not estimated."""
    from torch.profiler import ProfilerActivity, profile

    for p in method.parameters():
        p.grad = None
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto writes a line to fd 2 at each start and stop
        prof.start()
    try:
        method(batch).loss.backward()
    finally:
        with _quiet_stderr():
            prof.stop()
    for p in method.parameters():
        p.grad = None
    peak = profiled_peak_bytes(prof)
    if peak is None:
        raise RuntimeError("plan: this torch's profiler keeps no allocation records")
    return peak


def profiled_peak_bytes(prof) -> int | None:
    """Peak of live tensor bytes in a finished ``torch.profiler.profile(profile_memory=True)``,
    from replaying its allocation and free events; None on a torch without these internals."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def activation_bytes_per_sample(cfg: Config, method: torch.nn.Module, dtype) -> float:
    """The slope of the step's tensor peak between 8 and 16 samples: what does not grow with
    the batch (parameter gradients among it) cancels. Below 8 the peak can fall at another
    point of the step (the end of the backward, where the gradients are) and the slope reads
    low: 0.62 against 0.78 MiB per sample for configs/clip_vit_digits.yaml."""
    method.to(dtype)
    a = step_peak_bytes(method, example_batch(cfg, 8, dtype))
    b = step_peak_bytes(method, example_batch(cfg, 16, dtype))
    return (b - a) / 8


def half_precision_ratio(cfg: Config, dtype) -> float:
    """Activation bytes under ``dtype`` over fp32, measured on the same method at a small input
    (two patches' width, eight tokens): a CPU without bf16 units runs a full-size bf16 step
    40 times slower than fp32. About 0.5 for a ViT, 0.7 for a ResNet (BatchNorm keeps fp32)."""
    from dist_contrast.methods import build_method

    d = cfg.data
    side = max(2 * cfg.model.patch_size, 32 if "resnet" in cfg.model.encoder else 0)
    small = dataclasses.replace(d, image_size=side, context_length=min(d.context_length, 8))
    cfg = dataclasses.replace(cfg, data=small)
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    full = activation_bytes_per_sample(cfg, method, torch.float32)
    return activation_bytes_per_sample(cfg, method, dtype) / full


def read_model(cfg: Config, vocab_size: int) -> Model:
    """Build the config's method on the CPU (random weights) and read what the plan needs.
    A BPE tokenizer file that is not here (a cluster path) is replaced by the byte tokenizer
    and the text embedding counted at ``vocab_size`` rows."""
    from dist_contrast.methods import build_method
    from dist_contrast.train.optim import param_groups

    extra, note = 0, ""
    d = cfg.data
    if d.require_caption and d.tokenizer == "bpe" and not Path(d.tokenizer_path).is_file():
        extra = (vocab_size - BYTE_VOCAB) * cfg.text.width
        note = f"tokenizer {d.tokenizer_path} not here: a vocabulary of {vocab_size:,} assumed"
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, tokenizer="bytes"))
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.deepspeed.precision
    ]
    groups = [sum(p.numel() for p in g["params"]) for g in param_groups(method, 0.0)]
    groups[0] += extra  # the token embedding is a matrix: the decayed group
    sizes = [p.numel() for p in method.parameters() if p.requires_grad] + ([extra] if extra else [])
    frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
    with torch.no_grad():
        emb = method.embed(example_batch(cfg, 2))
    dim = int(next(iter(emb.values())).shape[-1])
    # DeepSpeed holds the model in bf16 / fp16 under those precisions: counted in fp32 (fast
    # on any CPU) and scaled by the ratio the two precisions show on a small input
    per_sample = activation_bytes_per_sample(cfg, method, torch.float32)
    if dtype != torch.float32:
        per_sample *= half_precision_ratio(cfg, dtype)
    loss_params = sum(p.numel() for p in method.loss_parameters() if p.requires_grad)
    return Model(groups, sizes, frozen, dim, per_sample, note, loss_params)


def loss_terms(cfg: Config, n: int, world: int, dim: int) -> list[Term]:
    """The loss's memory at ``n`` per GPU on ``world`` GPUs (fp32, each with its gradient):
    CLIP's two directions of [n, N] logits (tiles [n, tile] under ``loss.memory_efficient``),
    SimCLR's [v n, v N] over v views, and the gathered features [N, D] per gathered tensor;
    with a sharded queue, the N gathered queries scored against this rank's K / W rows."""
    big_n, name = n * world, cfg.method.name
    if name == "clip":
        rows, cols, blocks, gathered = n, big_n, 2, 2
    elif name == "simclr":
        v = cfg.data.views
        rows, cols, blocks, gathered = v * n, v * big_n, 1, v
    else:
        rows, cols, blocks, gathered = n, big_n, 1, 1
    if cfg.loss.memory_efficient:
        cols = min(cfg.loss.tile or cols, cols)
        logits = Term("loss tiles", 2 * 4 * rows * cols * blocks, f"{blocks} x [{rows}, {cols}]")
    else:
        logits = Term("loss logits", 2 * 4 * rows * cols * blocks, f"{blocks} x [{rows}, {cols}]")
    terms = [
        logits,
        Term("gathered features", 2 * 4 * big_n * dim * gathered, f"{gathered} x [{big_n}, {dim}]"),
    ]
    shard = queue_rows(cfg, world)
    if shard and world > 1:
        dirs = collective_layout(cfg)[1]
        terms.append(
            Term("queue scores", 2 * 4 * big_n * shard * dirs, f"{dirs} x [{big_n}, {shard}]")
        )
    return terms


def queue_rows(cfg: Config, world: int) -> int:
    """Rows of each queue this rank holds (K / W), 0 without one."""
    m = cfg.method
    if (m.name == "clip" and m.queues) or m.name == "moco_v2":
        return m.queue_size // world
    return 0


def queue_terms(cfg: Config, world: int, dim: int) -> list[Term]:
    rows, count = queue_rows(cfg, world), 2 if cfg.method.name == "clip" else 1
    if not rows:
        return []
    return [Term("queues", count * 4 * rows * dim, f"{count} x {rows:,} rows (K / W) x {dim}")]


def collective_layout(cfg: Config) -> tuple[int, int]:
    """(feature tensors [n, D] all-gathered with gradient per step, distributed log-sum-exp
    directions over a sharded queue) of the config's method, for the methods whose calls
    ``dist-contrast bench plan`` has counted; the others are refused, not guessed."""
    m = cfg.method.name
    if cfg.train.accumulation > 1 and (
        cfg.train.accumulation_mode == "plain" or cfg.deepspeed.zero_stage == 3
    ):
        raise UserError(
            "plan: the collectives of plain accumulation, and of accumulation under ZeRO-3, on "
            "several GPUs are not modelled yet (cached accumulation under ZeRO 0-2 is)"
        )
    if m == "clip" and cfg.loss.name == "clip":
        return (4, 2) if cfg.method.queues else (2, 0)
    if m == "simclr":
        return cfg.data.views, 0
    if m == "moco_v2":
        return 1, 1
    what = f"{m} with loss {cfg.loss.name}" if m == "clip" else m
    raise UserError(
        f"plan: the collectives of {what} on several GPUs are not modelled yet "
        "(clip, simclr and moco_v2 are; --gpus 1 plans any method)"
    )


def comm_terms(cfg: Config, m: Model, n: int, world: int) -> list[Term]:
    """Bytes this rank hands to collectives in one step of the engine (the inputs of the calls;
    ``dist-contrast bench plan`` counts them):

    - the features: an all-gather of [n, D] per gathered tensor in the forward, and in the
      backward an all-reduce of the whole [N, D] gradient (distributed._AllGatherWithGrad);
    - ZeRO 0-2: an all-reduce of every trainable gradient (DeepSpeed's bucket), the gradient
      norm (4 B, one per parameter group under ZeRO 1-2), and under ZeRO 1-2 the updated
      partitions all-gathered, each group padded to a multiple of 2 W elements;
    - ZeRO-3: a reduce-scatter of the gradients, each parameter padded to a multiple of W; one
      all-gather of each parameter's 1/W (in the forward, or after the step for the ones kept
      whole), and a second in the backward when the gathered set passes
      ``stage3_max_reuse_distance``; 16 B of norm and overflow flags."""
    stage, half, dim, big_n = (
        cfg.deepspeed.zero_stage,
        HALF[cfg.deepspeed.precision],
        m.dim,
        n * world,
    )
    gathers, dlse = collective_layout(cfg) if world > 1 else (0, 0)  # W = 1: nothing gathered
    rows = []
    if gathers:
        rows.append(
            Term(
                "feature all-gathers",
                gathers * n * dim * 4,
                f"{gathers} x [{n}, {dim}] fp32",
                kind="all_gather",
            )
        )
        how = f"{gathers} x [{big_n}, {dim}] fp32 (the whole gathered gradient)"
        rows.append(
            Term("feature gradient all-reduce", gathers * big_n * dim * 4, how, kind="all_reduce")
        )
    if dlse:
        how = f"{dlse} x 2 x [{big_n}] fp32, forward and backward"
        rows.append(
            Term("queue log-sum-exp exchange", 2 * dlse * big_n * 4, how, kind="all_reduce")
        )
    if stage < 3:
        # ZeRO-2 reduces at every micro-batch of accumulation, ZeRO 0-1 at the step's last; the
        # loss's parameters get their gradient in the first micro-batch only (cached)
        times = cfg.train.accumulation if stage == 2 else 1
        elements = m.trainable * times - m.loss_params * (times - 1)
        how = f"{m.trainable:,} x {half} B" + (f" x {times} micro-batches" if times > 1 else "")
        rows.append(Term("gradient all-reduce", half * elements, how, kind="all_reduce"))
        norms = len(m.groups) if stage else 1
        rows.append(Term("gradient norm", 4 * norms, f"{norms} x 4 B", kind="all_reduce"))
    if stage in (1, 2) and world > 1:  # one rank updates everything: nothing to gather
        align = 2 * world
        part = sum(math.ceil(g / align) * align // world for g in m.groups)
        how = f"{part:,} elements (groups padded to 2 W)"
        rows.append(Term("updated partitions all-gather", half * part, how, kind="all_gather"))
    if stage == 3:
        shards = sum(math.ceil(x / world) for x in m.sizes)
        how = f"{shards * world:,} x {half} B"
        rows.append(
            Term("gradient reduce-scatter", half * shards * world, how, kind="reduce_scatter")
        )
        keep = zero_setting(cfg, "stage3_param_persistence_threshold")
        gathered = sum(x for x in m.sizes if x > keep)
        again = gathered > zero_setting(cfg, "stage3_max_reuse_distance")
        twice = sum(math.ceil(x / world) for x in m.sizes if x > keep) if again else 0
        how = f"{shards + twice:,} elements" + (" (the backward gathers again)" if again else "")
        rows.append(Term("parameter all-gathers", half * (shards + twice), how, kind="all_gather"))
        rows.append(Term("gradient norm and overflow", 16, "stage 3's scalars", kind="all_reduce"))
    return rows


def memory_terms(cfg: Config, m: Model, n: int, world: int) -> list[Term]:
    """Per-GPU bytes of the config at ``n`` samples per GPU on ``world`` GPUs.

    With ``train.accumulation`` A, the activations are a micro-batch's (n / A); cached
    accumulation (GradCache) keeps the loss of all n and the n embeddings with their gradients,
    plain accumulation a micro-batch's loss. The cached loss and the micro-batches' activations
    are not live at once; both are counted (an upper bound by the smaller of the two)."""
    parts, cached = cfg.train.accumulation, cfg.train.accumulation_mode == "cached"
    micro = n // parts
    terms = model_state_terms(cfg, m, world) + queue_terms(cfg, world, m.dim)
    how = f"{m.per_sample / 2**20:.2f} MiB / sample x {micro}"
    terms.append(
        Term("activations", m.per_sample * micro, how + (f" (n / {parts})" if parts > 1 else ""))
    )
    if parts > 1 and cached:
        g = embedded_tensors(cfg)
        how = f"{g} x [{n}, {m.dim}] fp32 + grad"
        terms.append(Term("cached embeddings", 2 * 4 * n * m.dim * g, how))
    return terms + loss_terms(cfg, n if cached else micro, world, m.dim)


def embedded_tensors(cfg: Config) -> int:
    """[n, D] embeddings the method makes per step (the cached ones of GradCache)."""
    name = cfg.method.name
    if name == "clip":
        return 4 if cfg.method.queues else 2
    return cfg.data.views if name == "simclr" else 2


def total(terms: list[Term], resident: bool = False) -> float:
    """The sum of the terms; ``resident``: what a CPU's RSS shows (untouched buffers out)."""
    return sum(t.resident if resident and t.resident is not None else t.bytes for t in terms)


def plan(
    cfg: Config, gpus: int, gpu_memory_gb: float | None = None, vocab_size: int = 49408
) -> dict:
    """The plan of ``cfg`` on ``gpus`` GPUs: memory terms per GPU and their total, the bytes
    each rank sends per step, and with ``gpu_memory_gb`` the largest batch per GPU that fits.
    ``vocab_size``: the text vocabulary where the config's tokenizer file is not here."""
    if gpus > 1:
        collective_layout(cfg)  # refuse an unmodelled method before the minute of measuring
    m = read_model(cfg, vocab_size)
    return plan_for(cfg, m, gpus, cfg.train.batch_size, gpu_memory_gb)


def plan_for(cfg: Config, m: Model, gpus: int, n: int, gpu_memory_gb: float | None) -> dict:
    """:func:`plan` for a model already read (tables over many GPU counts read it once)."""
    terms = memory_terms(cfg, m, n, gpus)
    result = {
        "gpus": gpus,
        "batch_per_gpu": n,
        "global_batch": n * gpus,
        "trainable": m.trainable,
        "frozen": m.frozen,
        "embedding_dim": m.dim,
        "activation_bytes_per_sample": m.per_sample,
        "note": m.vocab_note,
        "terms": [dataclasses.asdict(t) for t in terms],
        "total_bytes": total(terms),
        "resident_bytes": total(terms, resident=True),
        "comm": [dataclasses.asdict(t) for t in comm_terms(cfg, m, n, gpus)],
    }
    result["comm_bytes"] = sum(t["bytes"] for t in result["comm"])
    result["wire_bytes"] = sum(wire_bytes(t, gpus) for t in result["comm"])
    if gpu_memory_gb:
        result["gpu_memory_gb"] = gpu_memory_gb
        result["max_batch_per_gpu"] = largest_batch(cfg, m, gpus, gpu_memory_gb * 1e9)
    return result


def largest_batch(cfg: Config, m: Model, gpus: int, budget: float) -> int:
    """The largest batch per GPU whose total fits ``budget`` bytes (0: not even one sample)."""

    def fits(n: int) -> bool:
        return total(memory_terms(cfg, m, n, gpus)) <= budget

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def table(result: dict) -> str:
    lines = [
        f"{result['gpus']:,} GPU(s), {result['batch_per_gpu']:,} per GPU, global batch "
        f"{result['global_batch']:,}; {result['trainable']:,} trainable parameters, "
        f"embedding {result['embedding_dim']}",
    ]
    if result["note"]:
        lines.append(result["note"])
    lines += ["", "| memory per GPU | GiB | how |", "|---|---:|---|"]
    for t in result["terms"]:
        lines.append(f"| {t['name']} | {t['bytes'] / GIB:.3f} | {t['how']} |")
    lines.append(f"| **total** | **{result['total_bytes'] / GIB:.2f}** | |")
    if "max_batch_per_gpu" in result:
        fit = result["max_batch_per_gpu"]
        lines.append(
            f"\nlargest batch per GPU in {result['gpu_memory_gb']:g} GB: {fit:,} "
            f"(global {fit * result['gpus']:,})"
        )
    if result["comm"]:
        lines += ["", "| sent per step, per rank | MiB | how |", "|---|---:|---|"]
        for t in result["comm"]:
            lines.append(f"| {t['name']} | {t['bytes'] / 2**20:.2f} | {t['how']} |")
        lines.append(f"| **total** | **{result['comm_bytes'] / 2**20:.2f}** | |")
    return "\n".join(lines)
