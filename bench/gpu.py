"""GPU benchmark of CLIP ViT-B/16: training step time and MFU, and the memory of the loss forms.

    dist-contrast bench gpu [--config configs/image_text/clip_vit_b16.yaml] [--out FILE]
    bench/gpu.sh                     (the same, with the checks a fresh GPU machine needs)
    bench/device_check.sh            (this and the tests marked gpu, on a lent GPU machine)

1. Step: the CLIP method of the config (ViT-B/16 image tower, 12-layer text transformer, as
   built for training; the byte tokenizer stands in for the BPE file, which changes only the
   token table, not the FLOPs), bf16 autocast, fused AdamW, one device, in up to four
   variants (--variants): eager, activation checkpointing, torch.compile of both towers, and
   both. Eager and checkpointing double the micro-batch from --min-batch until the device runs
   out of memory and time the largest that fits over --steps steps after --warmup; the compiled
   variants take the batch of their eager twin (halved while it does not fit). FLOPs of one
   step are counted once, eager, by torch.utils.flop_counter (matmuls, convolutions and
   attention; forward and backward; the recomputation of checkpointing is not counted: model
   FLOPs); MFU = FLOPs / step time / the device's dense bf16 peak (--peak-tflops, else from
   the table).
2. Loss memory: the CLIP loss (forward + backward) of one rank of W = --world holding N / W
   image and text features (512-d, fp32) of a global batch N in --loss-batches, "local" (its
   [N / W, N] logits materialised) against "tiled" (blocks of --tile). The one GPU stands in for
   that rank: the loss's all-gather returns this rank's rows followed by (W - 1) N / W random
   rows (with gradient) of the other ranks, and the world size reads W; the rest is
   dist_contrast.losses.clip_loss as training runs it. Extra peak memory over the inputs, or
   "OOM".

Writes --out (default bench/results/gpu.json, rewritten after each section, "complete" at the
end) and a Markdown table beside it (.md), with the device name. --budget-s skips the
variants not yet started once that many seconds have passed. Needs CUDA (--device cpu with
--smoke runs a tiny version to check the script itself; torch.compile then uses its "eager"
backend).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dist_contrast_bench.common import default_out, package_version, sync, write_json

# dense bf16 peak, TFLOP/s, of the SXM parts (NVIDIA data sheets); matched on the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
VARIANTS = ("eager", "checkpointing", "compile", "compile+checkpointing")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dist-contrast bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/image_text/clip_vit_b16.yaml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--min-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS))
    p.add_argument("--compile-backend", default=None, help="inductor (default; eager with --smoke)")
    p.add_argument("--loss-batches", default="65536,131072,262144")
    p.add_argument("--world", type=int, default=8, help="ranks the loss memory is of one of")
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=0.0, help="0: no limit")
    p.add_argument("--smoke", action="store_true", help="tiny model and batches (script check)")
    p.add_argument("--out", default=default_out("gpu.json"))
    args = p.parse_args(argv)
    try:
        args.loss_batches = [int(x) for x in args.loss_batches.split(",")]
    except ValueError:
        p.error(f"--loss-batches must be integers separated by commas, got {args.loss_batches!r}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)}; choose of {', '.join(VARIANTS)}")
    if args.world < 1 or any(n % args.world for n in args.loss_batches):
        p.error(f"--world must be >= 1 and divide every --loss-batches entry, got {args.world}")
    return args


def config(args: argparse.Namespace, checkpointing: bool = False):
    from dist_contrast.config import load_config

    over = ["data.tokenizer=bytes", "data.tokenizer_path="]
    if args.smoke:
        over += ["model.encoder=vit_tiny", "data.image_size=32", "data.context_length=16"]
        over += ["text.width=64", "text.layers=1", "text.heads=2"]
    if checkpointing:
        over.append("model.activation_checkpointing=true")
    return load_config(args.config, over)


def build(args: argparse.Namespace, dev: torch.device, checkpointing: bool = False):
    from dist_contrast.methods import build_method

    cfg = config(args, checkpointing)
    torch.manual_seed(0)
    return cfg, build_method(cfg).to(dev)


def batch_of(cfg, n: int, dev: torch.device) -> dict:
    d = cfg.data
    ids = torch.randint(3, 259, (n, d.context_length), device=dev)
    ids[:, -1] = 2  # end of text
    images = torch.randn(n, d.channels, d.image_size, d.image_size, device=dev)
    return {"view1": images, "tokens": ids}


def train_step(method, opt, batch: dict, dev: torch.device) -> None:
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = method(batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def fits(method, opt, cfg, n: int, dev: torch.device) -> bool:
    try:
        train_step(method, opt, batch_of(cfg, n, dev), dev)
        sync(dev)
        return True
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return False
    finally:
        free(dev)


def largest_batch(method, opt, cfg, args, dev: torch.device) -> int:
    best, n = 0, args.min_batch
    while n <= args.max_batch and fits(method, opt, cfg, n, dev):
        best, n = n, 2 * n
    if best == 0:
        raise RuntimeError(f"a micro-batch of {args.min_batch} does not fit on {dev}")
    return best


def fitting_batch(method, opt, cfg, n: int, dev: torch.device) -> int:
    """``n``, halved while one step of it does not fit."""
    while n >= 1 and not fits(method, opt, cfg, n, dev):
        n //= 2
    if n < 1:
        raise RuntimeError(f"no micro-batch fits on {dev}")
    return n


def step_flops(method, opt, cfg, n: int, dev: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(method, opt, batch_of(cfg, n, dev), dev)
    return counter.get_total_flops()


def time_steps(method, opt, cfg, n: int, args, dev: torch.device) -> list[float]:
    batch = batch_of(cfg, n, dev)
    for _ in range(args.warmup):
        train_step(method, opt, batch, dev)
    times = []
    for _ in range(args.steps):
        sync(dev)
        t0 = time.perf_counter()
        train_step(method, opt, batch, dev)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def run_variant(variant: str, args, dev: torch.device, state: dict) -> dict:
    """One step variant: its micro-batch, step times, throughput and MFU. ``state`` carries
    the FLOPs per sample and each eager variant's batch to the compiled ones."""
    compiled, checkpointing = variant.startswith("compile"), variant.endswith("checkpointing")
    cfg, method = build(args, dev, checkpointing)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4, fused=dev.type == "cuda")
    try:
        if compiled:
            for tower in (method.image, method.text):
                tower.compile(backend=args.compile_backend)
            twin = state["batch"].get("checkpointing" if checkpointing else "eager")
            n = fitting_batch(method, opt, cfg, twin or args.min_batch, dev)
        else:
            n = largest_batch(method, opt, cfg, args, dev)
            state["batch"][variant] = n
        if "flops_per_sample" not in state:  # model FLOPs: eager, no recomputation
            state["flops_per_sample"] = step_flops(method, opt, cfg, n, dev) / n
        t0 = time.perf_counter()
        times = sorted(time_steps(method, opt, cfg, n, args, dev))
        wall = time.perf_counter() - t0
    finally:
        del method, opt
        if compiled:
            torch._dynamo.reset()
        free(dev)
    median = times[len(times) // 2]
    achieved = state["flops_per_sample"] * n / median / 1e12
    peak = state["peak"]
    return {
        "variant": variant,
        "micro_batch": n,
        "step_ms_median": 1e3 * median,
        "step_ms": [1e3 * t for t in times],
        "samples_per_s": n / median,
        "tflops_achieved": achieved,
        "mfu": achieved / peak if peak else None,
        "timing_wall_s": wall,  # warm-up (compilation included) and timed steps
    }


@contextmanager
def stand_in_rank(world: int) -> Iterator[None]:
    """This process as rank 0 of ``world`` for the losses: the all-gather returns the local rows
    followed by (world - 1) times as many random rows of the other ranks, and the world size
    reads ``world``. Without a process group; restored on exit."""
    from dist_contrast import distributed

    real = distributed.all_gather_with_offset, distributed.world_size, distributed.is_dist

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        shape = ((world - 1) * x.shape[0], *x.shape[1:])
        others = torch.randn(shape, device=x.device, dtype=x.dtype)
        return torch.cat([x, others]), 0

    distributed.all_gather_with_offset = gather
    distributed.world_size, distributed.is_dist = (lambda: world), (lambda: True)
    try:
        yield
    finally:
        distributed.all_gather_with_offset, distributed.world_size, distributed.is_dist = real


def loss_memory(n: int, world: int, tiled: bool, tile: int, dev: torch.device) -> float | str:
    """Extra peak GiB of the CLIP loss forward + backward of one rank of ``world`` over its
    inputs (N / world rows each) at a global batch of ``n``, or "OOM"."""
    from dist_contrast.losses import clip_loss

    try:
        local = n // world
        img = torch.randn(local, 512, device=dev, requires_grad=True)
        txt = torch.randn(local, 512, device=dev, requires_grad=True)
        scale = torch.tensor(2.6593, device=dev, requires_grad=True)
        sync(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with stand_in_rank(world):
            loss = clip_loss(img, txt, scale, memory_efficient=tiled, tile=tile if tiled else None)
            loss.backward()
        sync(dev)
        if dev.type != "cuda":
            return float("nan")
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**30
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        free(dev)


def device_info(dev: torch.device) -> tuple[str, float | None]:
    if dev.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) else str(x)


def step_line(r: dict) -> str:
    """One row of the step table."""
    if "step_ms_median" not in r:
        return f"| {r['variant']} | {r.get('error') or r.get('skipped')} | | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    return (
        f"| {r['variant']} | {r['micro_batch']} | {r['step_ms_median']:.1f} | "
        f"{r['samples_per_s']:.0f} | {r['tflops_achieved']:.0f} | {mfu} |"
    )


def table(result: dict) -> str:
    """The Markdown tables of a result."""
    lines = [
        f"CLIP {result['model']} on {result['device']} (torch {result['torch']}), bf16 autocast",
        "",
        "| variant | micro-batch | step ms | samples/s | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
        *[step_line(r) for r in result["steps"]],
    ]
    w = result["loss_world"]
    lines += [
        "",
        f"CLIP loss, one rank of W = {w} (N / {w} rows against N), extra peak GiB over the inputs",
        "",
        "| global batch N | local | tiled |",
        "|---:|---:|---:|",
    ]
    for r in result["loss_memory"]:
        local, tiled = _fmt(r["local_gib"], ".2f"), _fmt(r["tiled_gib"], ".2f")
        lines.append(f"| {r['global_batch']:,} | {local} | {tiled} |")
    return "\n".join(lines) + "\n"


def save(args, result: dict) -> Path:
    out = write_json(args.out, result)
    out.with_suffix(".md").write_text(table(result))
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    start = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (use a GPU machine, or --device cpu --smoke)")
        return 2
    if args.smoke:
        args.min_batch, args.max_batch, args.steps, args.warmup = 2, 4, 2, 1
        args.loss_batches, args.tile = [256, 512], 128
        args.compile_backend = args.compile_backend or "eager"
    args.compile_backend = args.compile_backend or "inductor"
    torch.backends.cuda.matmul.allow_tf32 = True
    name, peak = device_info(dev)
    peak = args.peak_tflops or peak
    cfg = config(args)
    m, t = cfg.model, cfg.text
    model = f"{m.encoder}/{m.patch_size} + text {t.layers}x{t.width}"
    print(f"CLIP {model} on {name}")
    result = {
        "device": name,
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "config": args.config,
        "model": model,
        "smoke": args.smoke,
        "peak_tflops_bf16": peak,
        "flops_per_sample": None,
        "steps": [],
        "loss_memory": [],
        "loss_world": args.world,
        "loss_tile": args.tile,
        "complete": False,
        "command": "dist-contrast bench gpu " + " ".join(argv or []),
    }
    state = {"batch": {}, "peak": peak}
    over_budget = lambda: args.budget_s and time.perf_counter() - start > args.budget_s  # noqa: E731
    for i, variant in enumerate(args.variants):
        if over_budget():
            row = {"variant": variant, "skipped": f"time budget ({args.budget_s:.0f} s) spent"}
        else:
            try:
                row = run_variant(variant, args, dev, state)
            except Exception as exc:  # one variant failing (compile) leaves the others
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                row = {"variant": variant, "error": f"{type(exc).__name__}: {first}"}
        result["steps"].append(row)
        result["flops_per_sample"] = state.get("flops_per_sample")
        print("  " + step_line(row))
        save(args, result)
        if i == 0:  # the loss memory right after the first variant: cheap, and wanted most
            for nb in args.loss_batches:
                row = {"global_batch": nb}
                for form, tiled in (("local", False), ("tiled", True)):
                    row[f"{form}_gib"] = loss_memory(nb, args.world, tiled, args.tile, dev)
                result["loss_memory"].append(row)
                print(f"  loss memory N={nb}, W={args.world}: {row}")
                save(args, result)
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - start
    print(table(result))
    print(f"wrote {save(args, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
