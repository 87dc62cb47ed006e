"""The training engine's step, by phase, next to a plain PyTorch DDP loop on the same towers and
batches: what the engine costs over the floor (the target: within 5% of the plain loop).

    dist-contrast bench train CONFIG [KEY=VALUE ...] [--steps 10] [--warmup 3] [--out FILE]
                                     [--dir DIR] [--batches 8] [--profile DIR]
                                     [--order interleaved|sequential]
    torchrun --nproc_per_node 2 -m dist_contrast.cli bench train CONFIG [KEY=VALUE ...]

One process, or one per rank under torchrun (srun, the deepspeed launcher): the ranks run both
loops together. ``KEY=VALUE`` are config overrides as for ``dist-contrast train``; the bench sets
the run folder (a temporary one, under ``--dir`` if given), ``train.steps`` (warm-up + timed),
and turns wandb, the progress bar, plots and periodic evaluation off.

- engine: the real thing, as ``dist-contrast train`` runs it: ``train_loader`` (its workers),
  ``build_method``, ``setup.wrap`` (DeepSpeed: ZeRO stage, precision, gradient clipping, the
  optimizer of ``train.optimizer``), ``Trainer.run`` (device augmentation, the NaN guard, the
  LR schedule, ``metrics.jsonl`` every ``train.log_every`` steps, a checkpoint at the last
  step). Timed from outside by wrapping calls of the objects, not by editing them:
  ``data`` (waiting for the loader), ``augment`` (``Trainer.augment_batch``), ``forward``
  (``method.embed``), ``loss`` (``method.loss``: the gathers of negatives included),
  ``backward`` (``engine.backward``: DeepSpeed's gradient reduction included), ``optimizer``
  (``engine.step``: clipping, the guard's all-reduced decision, the update), ``log``
  (``Trainer.record``: the all-reduced means and the embedding metrics of the step's own
  embeddings, + the logger; its mean per call divided by ``train.log_every``), ``checkpoint``
  (``Trainer.save``: the one at the last step, a real save with its manifest, divided by
  ``checkpoint.every``), ``other`` (the rest of the step's wall time; ``in train_step`` is
  the part of it inside ``Trainer.train_step``: DeepSpeed's forward wrapper, the guard's
  hooks, the LR schedule).
- floor: the same method built at the same seed (the same weights), its dtype that of
  ``deepspeed.precision`` (bf16: bf16 weights, no fp32 master copy; ``train.compile``: its
  blocks compiled as the engine's are), in
  ``torch.nn.parallel.DistributedDataParallel``; ``torch.optim.AdamW`` with the engine's
  parameter groups, lr and betas (gradients clipped to ``train.grad_clip`` as the engine
  does); the first ``--batches`` batches the engine trained on, already augmented, kept in
  memory and cycled. Per step: ``forward`` (``ddp(batch, mode="embed")``), ``loss``
  (``method.loss``, the same function as the engine's), ``backward`` (DDP's all-reduce
  included), ``optimizer`` (clip, AdamW, zero_grad). No loader, no DeepSpeed, no LR schedule,
  no logging or checkpoints.

Order (``--order``): ``interleaved`` (the default) builds both and runs one floor step after
each engine step, on the batches the engine has augmented so far (floor step i on batch
i mod ``--batches``, as in the sequential order), so that the two steps of a pair run seconds
apart and a machine whose speed drifts (a shared VM: the same forward + backward moved by 20%
between runs here) slows both alike; the loader's workers run beside both. ``sequential``
runs the engine's whole run, then the floor's, and gives each loop's own peak memory.

Figures: the mean of each phase over the ``--steps`` steps after ``--warmup`` (each rank's,
then the mean over ranks); ``step`` is a whole step's wall time, checkpoint and log line amortised
(the slowest rank's); samples/s = ``train.batch_size`` x ranks / step. Interleaved, also the
ratio over the paired steps with its 95% bootstrap interval, from which the verdict (within 5%
of the floor, not within, or not settled) is read. Peak memory: each rank's peak RSS
(Linux: the peak is reset before the loop; the engine's loader workers are processes of their
own, not counted): of each loop in the sequential order, of both loops together interleaved;
``torch.cuda.max_memory_allocated`` on CUDA likewise. CPU ms/step: the same figures of CPU
time (``time.process_time``: the rank's process, all its threads; not the loader's workers),
steadier than wall time on a loaded machine. Phases on CUDA are timed with a device
synchronisation around each (which the engine does not do by itself).

Model FLOPs: one step of this rank's first batch counted by ``torch.utils.flop_counter``
(forward, loss and backward; eager, without a checkpointed block's recomputation: the floor's
towers, or an eager copy of them), per sample; each loop's model TFLOP/s per device follows
from its samples/s, and MFU from the device's peak (``--peak-tflops``, else the bf16 peak of a
known CUDA device, as ``bench gpu``; none on a CPU).

``--profile DIR``: both loops' timed steps under ``torch.profiler``, in the sequential order;
each rank writes ``DIR/engine_rank<R>.txt`` and ``floor_rank<R>.txt`` (``key_averages`` sorted
by self CPU time). Timings of a profiled run are not the figures to report.

Results: a table, and ``--out`` (default bench/results/train.json) from rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dist_contrast_bench.common import (
    cpu_model,
    default_out,
    package_version,
    usable_cores,
    write_json,
)
from dist_contrast_bench.gpu import device_info
from dist_contrast_bench.train_phases import CPU, Phases, peak_memory, reset_peak, summarise

ENGINE_PHASES = ("data", "augment", "forward", "loss", "backward", "optimizer", "log", "checkpoint")
FLOOR_PHASES = ("forward", "loss", "backward", "optimizer")
TRAIN_STEP = ("forward", "loss", "backward", "optimizer")  # what Trainer.train_step calls
ORDERS = ("interleaved", "sequential")
RESAMPLES = 2000  # bootstrap resamples of the paired steps
LABELS = {
    "data": "data wait",
    "augment": "augment (device)",
    "forward": "forward (embed)",
    "loss": "loss (incl. gathers)",
    "backward": "backward (incl. grad reduction)",
    "optimizer": "optimizer step",
    "log": "log (1 line / log_every)",
    "checkpoint": "checkpoint (1 save / every)",
    "other": "other",
    "in_train_step": "  of which in train_step",
}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="a run config (YAML), as for dist-contrast train")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batches", type=int, default=8, help="batches the floor keeps and cycles")
    p.add_argument("--dir", help="where the run folder goes (default: a temporary folder)")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="interleaved",
        help="interleaved: a floor step after each engine step (default); sequential: the "
        "engine's run, then the floor's (each loop's own peak memory)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="profile the timed steps, tables to DIR (runs the loops in sequential order)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak TFLOP/s at the run's precision, for MFU (default: known "
        "CUDA devices' bf16 peak, as bench gpu; none on a CPU)",
    )
    p.add_argument("--out", default=default_out("train.json"))
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batches < 1:
        p.error("--steps and --batches must be at least 1, --warmup at least 0")
    if args.profile:
        args.order = "sequential"  # one profile per loop
    return args


def bench_config(args: argparse.Namespace, run_dir: Path):
    """The config of ``args`` with the bench's run folder, step count and quiet logging."""
    from dist_contrast.config import load_config

    fixed = [
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        f"train.steps={args.warmup + args.steps}",
        "train.stop_at=0",
        "checkpoint.resume=",
        "eval.every=0",
        "logging.wandb=false",
        "logging.progress=false",
        "logging.plots=false",
    ]
    return load_config(args.config, [*args.overrides, *fixed])


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class Seen:
    """What the engine's run leaves for the floor: its first batches (augmented) and the loss
    of its first step."""

    keep: int
    batches: list[dict] = field(default_factory=list)
    first_loss: torch.Tensor | None = None


def _copy(batch: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def instrument(trainer, method, phases: Phases, seen: Seen, floor: Floor | None = None) -> None:
    """Time the trainer's calls by phase (instance attributes over its methods, the engine's
    and the method's) and keep what ``seen`` asks for. With a ``floor``, each engine step is
    followed by one floor step on the batches seen so far (the interleaved order)."""
    engine = trainer.engine
    method.embed = phases.wrap("forward", method.embed)
    loss = phases.wrap("loss", method.loss)

    def first_loss(emb, batch):
        out = loss(emb, batch)
        if seen.first_loss is None:
            seen.first_loss = out.loss.detach().clone()
        return out

    method.loss = first_loss
    augment = phases.wrap("augment", trainer.augment_batch)

    def kept(batch):
        out = augment(batch)
        if len(seen.batches) < seen.keep:
            seen.batches.append(_copy(out))
        return out

    trainer.augment_batch = kept
    engine.backward = phases.wrap("backward", engine.backward)
    engine.step = phases.wrap("optimizer", engine.step)
    trainer.record = phases.wrap("log", trainer.record)
    trainer.save = phases.wrap("checkpoint", trainer.save)
    trainer.train_step = phases.envelope("train_step", trainer.train_step)
    loop = trainer.loop

    def timed_loop() -> None:  # Trainer.run has made the fetcher: its waits start each step
        fetch = trainer.fetcher.next

        def pair() -> None:  # close the engine's step, then the floor's step beside it
            phases.end()
            while floor is not None and seen.batches and floor.done < len(phases.rows):
                floor.step(seen.batches[floor.done % len(seen.batches)])

        def next_batch(*args, **kwargs):
            pair()
            phases.begin_step()
            return phases.timed("data", fetch, *args, **kwargs)

        trainer.fetcher.next = next_batch
        try:
            loop()
        finally:
            phases.end()
        pair()

    trainer.loop = timed_loop


def run_engine(
    cfg, rank: int, world: int, phases: Phases, seen: Seen, floor: Floor | None = None
) -> dict:
    """Train ``cfg`` as ``dist-contrast train`` does, timed (a step of ``floor`` after each of
    its steps, if given); this rank's peak memory."""
    from dist_contrast import distributed
    from dist_contrast.data.loader import train_loader
    from dist_contrast.methods import build_method
    from dist_contrast.train.engine import Trainer
    from dist_contrast.train.metrics import MetricsLogger
    from dist_contrast.train.setup import wrap

    if rank == 0:
        (cfg.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank, and in the floor
    method = build_method(cfg)
    engine, _, scheduler = wrap(method, cfg, world)
    loader = train_loader(cfg.data, cfg.augment, cfg.train.batch_size, cfg.run.seed, rank, world)
    trainer = Trainer(cfg, engine, scheduler, loader, rank, world)
    instrument(trainer, method, phases, seen, floor)
    try:
        trainer.logger = MetricsLogger(cfg.run_dir, cfg, 0, enabled=rank == 0)
        trainer.logger.log = phases.wrap("log", trainer.logger.log)
        reset_ok = reset_peak(phases.dev)
        try:
            trainer.run()
        finally:
            trainer.logger.close()
    finally:
        loader.close()
    return peak_memory(phases.dev, reset_ok)


# --------------------------------------------------------------------------------------------
# The floor


class Floor:
    """The plain DDP loop: ``step`` trains one batch, timed by phase into ``phases``."""

    def __init__(self, cfg, phases: Phases) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from dist_contrast.methods import build_method
        from dist_contrast.models import compile_blocks
        from dist_contrast.train.engine import PRECISION
        from dist_contrast.train.optim import param_groups

        dev = phases.dev
        torch.manual_seed(cfg.run.seed)
        self.method = build_method(cfg).to(dev, PRECISION[cfg.deepspeed.precision])
        if cfg.train.compile:  # the engine's blocks are compiled: the floor's too, like for like
            compile_blocks(self.method)
        ids = [dev.index] if dev.type == "cuda" else None
        self.model = DistributedDataParallel(self.method, device_ids=ids)
        groups = param_groups(self.method, cfg.train.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999))
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.clip = cfg.train.grad_clip
        self.phases = phases
        self.first_loss: torch.Tensor | None = None
        self.done = 0

    def _update(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch: dict) -> None:
        phases = self.phases
        phases.begin_step()
        emb = phases.timed("forward", self.model, batch, mode="embed")
        out = phases.timed("loss", self.method.loss, emb, batch)
        phases.timed("backward", out.loss.backward)
        phases.timed("optimizer", self._update)
        phases.end()
        if self.first_loss is None:
            self.first_loss = out.loss.detach().clone()
        self.done += 1


def run_floor(cfg, batches: list[dict], total: int, phases: Phases) -> tuple[Floor, dict]:
    """``total`` steps of the plain DDP loop over ``batches``, after the engine's run; the
    floor (its loss at step 1 in ``first_loss``) and this rank's peak memory."""
    floor = Floor(cfg, phases)
    reset_ok = reset_peak(phases.dev)
    for i in range(total):
        floor.step(batches[i % len(batches)])
    return floor, peak_memory(phases.dev, reset_ok)


def step_flops(cfg, floor: Floor, batch: dict) -> int:
    """Model FLOPs of one training step on this rank's batch: forward, loss and backward
    (``torch.utils.flop_counter``: matrix products and attention; the optimizer, elementwise
    work and a checkpointed block's recomputation not counted), as MFU counts them. Counted on
    the floor's towers, or on an eager copy where they are compiled (a compiled region is not
    seen by the counter); the gradients are dropped after."""
    from torch.utils.flop_counter import FlopCounterMode

    from dist_contrast.methods import build_method
    from dist_contrast.train.engine import PRECISION

    method = floor.method
    if cfg.train.compile or cfg.model.activation_checkpointing:
        eager = replace(cfg, model=replace(cfg.model, activation_checkpointing=False))
        torch.manual_seed(cfg.run.seed)
        method = build_method(eager).to(floor.phases.dev, PRECISION[cfg.deepspeed.precision])
    counter = FlopCounterMode(display=False)
    with counter:
        emb = method(batch, mode="embed")
        method.loss(emb, batch).loss.backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------
# Profiling


def _profiler(args: argparse.Namespace, phases: Phases, path: Path):
    """A started ``torch.profiler.profile`` recording the timed steps of ``phases`` (stepped at
    each step start), writing its table to ``path`` when done."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU]
    if phases.dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)

    def ready(prof) -> None:
        sort = "self_cuda_time_total" if phases.dev.type == "cuda" else "self_cpu_time_total"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=50) + "\n")

    # step_num s (s >= 1) is step s of the loop: record steps warmup+1 .. warmup+steps
    prof = profile(
        activities=activities,
        schedule=schedule(wait=args.warmup, warmup=1, active=args.steps, repeat=1),
        on_trace_ready=ready,
    )
    phases.on_step.append(prof.step)
    return prof


# --------------------------------------------------------------------------------------------
# One rank's figures, the table, main


def measure(cfg, args: argparse.Namespace, rank: int, world: int) -> dict:
    """Both loops on this rank, in ``args.order``: the figures of each, and their losses at
    step 1."""
    from dist_contrast import distributed

    dev = distributed.device()
    engine_phases, floor_phases, seen = Phases(dev), Phases(dev), Seen(args.batches)
    if args.order == "interleaved":
        floor = Floor(cfg, floor_phases)
        engine_mem = run_engine(cfg, rank, world, engine_phases, seen, floor)
        floor_loss, floor_mem = floor.first_loss, engine_mem  # one process peak, both loops
    else:
        with ExitStack() as stack:
            if args.profile:
                path = Path(args.profile, f"engine_rank{rank}.txt")
                stack.enter_context(_profiler(args, engine_phases, path))
            engine_mem = run_engine(cfg, rank, world, engine_phases, seen)
        gc.collect()
        with ExitStack() as stack:
            if args.profile:
                path = Path(args.profile, f"floor_rank{rank}.txt")
                stack.enter_context(_profiler(args, floor_phases, path))
            floor, floor_mem = run_floor(cfg, seen.batches, args.warmup + args.steps, floor_phases)
            floor_loss = floor.first_loss
    gc.collect()
    flops = step_flops(cfg, floor, seen.batches[0])
    return {
        "rank": rank,
        "engine": {
            **_figures(engine_phases.rows, args.warmup, ENGINE_PHASES, cfg),
            "memory": engine_mem,
            "loss_step1": float(seen.first_loss),
        },
        "floor": {
            **_figures(floor_phases.rows, args.warmup, FLOOR_PHASES, cfg),
            "memory": floor_mem,
            "loss_step1": float(floor_loss),
        },
        "rows": {"engine": engine_phases.rows, "floor": floor_phases.rows},
        "flops_per_step": flops,
    }


def _figures(rows: list[dict], warmup: int, phases: tuple[str, ...], cfg) -> dict:
    """Wall ms per step by phase, and the same of CPU time under ``cpu``."""
    amortised = {"checkpoint": cfg.checkpoint.every, "log": cfg.train.log_every}
    out = {}
    for key in ("", CPU):
        figures = summarise(rows, warmup, phases, amortised, ("train_step",), key)
        train_step = figures.pop("train_step")
        if "data" in phases:  # the engine: what train_step spends outside the four phases
            figures["in_train_step"] = train_step - sum(figures[p] for p in TRAIN_STEP)
        if key:
            out["cpu"] = figures
        else:
            out.update(figures)
    return out


def combine(ranks: list[dict], batch_size: int) -> dict:
    """Per loop: each phase's mean over ranks, the slowest rank's step, samples/s; the same of
    CPU time (mean over ranks) under ``cpu``."""
    world, out = len(ranks), {}
    for loop in ("engine", "floor"):
        figures = [r[loop] for r in ranks]
        mean = _mean(figures)
        mean["step"] = max(f["step"] for f in figures)
        mean["samples_per_s"] = batch_size * world / (mean["step"] / 1e3)
        mean["cpu"] = _mean([f["cpu"] for f in figures])
        mean["peak_rss_mib"] = [f["memory"]["peak_rss_mib"] for f in figures]
        if "cuda_max_allocated_mib" in figures[0]["memory"]:
            mean["cuda_max_allocated_mib"] = [
                f["memory"]["cuda_max_allocated_mib"] for f in figures
            ]
        out[loop] = mean
    out["ratio"] = out["engine"]["samples_per_s"] / out["floor"]["samples_per_s"]
    out["cpu_ratio"] = out["floor"]["cpu"]["step"] / out["engine"]["cpu"]["step"]
    out["flops_per_sample"] = sum(r["flops_per_step"] for r in ranks) / (world * batch_size)
    return out


def utilisation(result: dict, peak_tflops: float | None) -> None:
    """Model TFLOP/s per device of each loop (the counted FLOPs per sample x its samples/s /
    ranks) and, given the device's peak, MFU; into ``result``."""
    world = result["setup"]["world"]
    for loop in ("engine", "floor"):
        achieved = result["flops_per_sample"] * result[loop]["samples_per_s"] / world / 1e12
        result[loop]["tflops_per_device"] = achieved
        result[loop]["mfu"] = achieved / peak_tflops if peak_tflops else None
    result["peak_tflops"] = peak_tflops


def paired_interval(ranks: list[dict], warmup: int, amortised_ms: float) -> dict:
    """The engine / floor samples/s ratio from the steady steps taken as pairs (engine step i,
    floor step i: the slowest rank's wall time of each, the engine's without its save and log
    line, whose amortised cost ``amortised_ms`` is added back), and its 95% bootstrap interval
    (the pairs resampled :data:`RESAMPLES` times, seed 0). In the interleaved order the two
    steps of a pair run seconds apart, so the machine's drift falls on both."""
    import random

    def slowest(loop: str) -> list[float]:
        per_rank = [
            [1e3 * (r["wall"] - r.get("checkpoint", 0.0) - r.get("log", 0.0)) for r in rows]
            for rows in (rank["rows"][loop][warmup:] for rank in ranks)
        ]
        return [max(step) for step in zip(*per_rank, strict=True)]

    engine, floor = slowest("engine"), slowest("floor")
    n = min(len(engine), len(floor))

    def ratio(idx: list[int]) -> float:
        e = sum(engine[i] for i in idx) / len(idx) + amortised_ms
        return (sum(floor[i] for i in idx) / len(idx)) / e

    rng = random.Random(0)
    draws = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(RESAMPLES))
    low, high = draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]
    return {"ratio": ratio(list(range(n))), "low": low, "high": high, "pairs": n}


def verdict(result: dict, bound: float = 0.95) -> str:
    """Whether the engine is within 5% of the floor: from the paired interval where the loops
    were interleaved, else from the ratio alone."""
    paired = result.get("paired")
    if paired is None:
        return "within" if result["ratio"] >= bound else "NOT within"
    if paired["low"] >= bound:
        return "within"
    if paired["high"] < bound:
        return "NOT within"
    return "not settled (the interval spans 0.95; more --steps narrow it) whether within"


def _mean(figures: list[dict]) -> dict:
    keys = [k for k, v in figures[0].items() if isinstance(v, float) and k != "loss_step1"]
    return {k: sum(f[k] for f in figures) / len(figures) for k in keys}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(result: dict) -> str:
    e, f = result["engine"], result["floor"]
    c = result["setup"]
    lines = [
        f"{c['summary']}; {c['world']} rank(s) x {c['batch_size']}; {result['steps']} steps "
        f"after {result['warmup']} warm-up; {result['cpu']}, {result['threads']} thread(s)/rank",
        "",
        "| phase | engine ms/step | floor ms/step | engine / floor "
        "| engine CPU ms/step | floor CPU ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in LABELS.items():
        fv = f.get(key)
        ratio = f"{e[key] / fv:.2f}" if fv else ""
        cpu = f"{_ms(e['cpu'].get(key))} | {_ms(f['cpu'].get(key))}"
        lines.append(f"| {label} | {_ms(e.get(key))} | {_ms(fv)} | {ratio} | {cpu} |")
    lines.append(
        f"| **step** | {_ms(e['step'])} | {_ms(f['step'])} | {e['step'] / f['step']:.2f} "
        f"| {_ms(e['cpu']['step'])} | {_ms(f['cpu']['step'])} |"
    )
    lines.append(
        f"| **samples/s** | {e['samples_per_s']:.1f} | {f['samples_per_s']:.1f} | "
        f"**{result['ratio']:.3f}** | floor / engine CPU: **{result['cpu_ratio']:.3f}** | |"
    )
    if "tflops_per_device" in e:
        mfu = [f"{100 * loop['mfu']:.1f}%" if loop["mfu"] else "n/a" for loop in (e, f)]
        lines.append(
            f"| model TFLOP/s per device (MFU) | {e['tflops_per_device']:.3g} ({mfu[0]}) "
            f"| {f['tflops_per_device']:.3g} ({mfu[1]}) | | | |"
        )
    rss = [" / ".join(f"{x:.0f}" for x in loop["peak_rss_mib"]) for loop in (e, f)]
    if result["order"] == "interleaved":  # one process holds both loops
        lines.append(f"| peak RSS MiB per rank, both loops | {rss[0]} | | | | |")
    else:
        lines.append(f"| peak RSS MiB per rank | {rss[0]} | {rss[1]} | | | |")
    if "cuda_max_allocated_mib" in e:
        cuda = [" / ".join(f"{x:.0f}" for x in loop["cuda_max_allocated_mib"]) for loop in (e, f)]
        lines.append(f"| CUDA max allocated MiB per rank | {cuda[0]} | {cuda[1]} | | | |")
    paired = result.get("paired")
    interval = (
        f" (95% interval over {paired['pairs']} paired steps: "
        f"{paired['low']:.3f}-{paired['high']:.3f})"
        if paired
        else ""
    )
    lines += [
        "",
        f"{result['order']} order; engine / floor samples/s = {result['ratio']:.3f}{interval}: "
        f"{verdict(result)} 5% of the plain DDP loop "
        f"(CPU time per step of the ranks, floor / engine: {result['cpu_ratio']:.3f}); "
        f"loss at step 1, rank 0: engine {result['loss_step1']['engine'][0]:.6f}, "
        f"floor {result['loss_step1']['floor'][0]:.6f}",
    ]
    return "\n".join(lines)


def describe(cfg) -> dict:
    m, t, d = cfg.model, cfg.text, cfg.data
    image = f"{m.encoder} patch {m.patch_size}" if m.encoder.startswith("vit") else m.encoder
    text = f", text {t.width} x {t.layers}" if cfg.method.name == "clip" else ""
    return {
        "summary": f"{cfg.method.name}: {image} at {d.image_size} px{text}, "
        f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}",
        "method": cfg.method.name,
        "encoder": m.encoder,
        "patch_size": m.patch_size,
        "image_size": d.image_size,
        "text": {"width": t.width, "layers": t.layers, "heads": t.heads},
        "context_length": d.context_length,
        "batch_size": cfg.train.batch_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": cfg.deepspeed.precision,
        "checkpoint_every": cfg.checkpoint.every,
        "log_every": cfg.train.log_every,
        "num_workers": d.num_workers,
    }


def _shared_dir(parent: str | None) -> Path:
    """A fresh folder made by rank 0, its path the same on every rank."""
    import torch.distributed as dist

    from dist_contrast import distributed

    made = [tempfile.mkdtemp(prefix="bench-train-", dir=parent) if distributed.is_main() else ""]
    if distributed.world_size() > 1:
        dist.broadcast_object_list(made, src=0)
    return Path(made[0])


def _gather(mine: dict) -> list[dict]:
    import torch.distributed as dist

    from dist_contrast import distributed

    if distributed.world_size() == 1:
        return [mine]
    every: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(every, mine)
    return every


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    from dist_contrast import distributed
    from dist_contrast.train.setup import prepare

    env = distributed.init()
    tmp = None
    try:
        tmp = _shared_dir(args.dir)
        cfg = bench_config(args, tmp / "run")
        prepare(cfg, env.world_size)
        mine = measure(cfg, args, env.rank, env.world_size)
        ranks = _gather(mine)
        distributed.barrier()
    finally:
        if tmp is not None and distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.shutdown()
    if env.rank != 0:
        return 0
    result: dict[str, Any] = {
        "setup": {**describe(cfg), "world": env.world_size},
        "steps": args.steps,
        "warmup": args.warmup,
        "profiled": bool(args.profile),
        "order": args.order,
        **combine(ranks, cfg.train.batch_size),
        "loss_step1": {
            loop: [r[loop]["loss_step1"] for r in ranks] for loop in ("engine", "floor")
        },
        "ranks": ranks,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "command": "dist-contrast bench train " + " ".join(argv or sys.argv[1:]),
    }
    if args.order == "interleaved":
        e = result["engine"]
        result["paired"] = paired_interval(ranks, args.warmup, e["checkpoint"] + e["log"])
    result["device"], peak = device_info(distributed.device())
    utilisation(result, args.peak_tflops or peak)
    print(table(result))
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
