"""GPU benchmark of CLIP ViT-B/16: training step time and MFU, and the memory of the loss forms.

    dist-contrast bench gpu [--config configs/image_text/clip_vit_b16.yaml] [--out FILE]
    bench/gpu.sh                     (the same, with the checks a fresh GPU machine needs)

1. Step: the CLIP method of the config (ViT-B/16 image tower, 12-layer text transformer, as
   built for training; the byte tokenizer stands in for the BPE file, which changes only the
   token table, not the FLOPs), bf16 autocast, fused AdamW, one device. The micro-batch is
   doubled from --min-batch until the device runs out of memory; the largest that fits is
   timed over --steps steps after --warmup. FLOPs of one step are counted by
   torch.utils.flop_counter (matmuls, convolutions and attention; forward and backward), MFU =
   FLOPs / step time / the device's dense bf16 peak (--peak-tflops, else from the table).
2. Loss memory: the CLIP loss (forward + backward) of one process holding N image and N text
   features (512-d, fp32) for N in --loss-batches, "local" (the [N, N] logits materialised)
   against "tiled" (blocks of --tile); extra peak memory over the inputs, or "OOM".

Writes --out (default bench/results/gpu.json) with the device name. Needs CUDA (--device cpu
with --smoke runs a tiny version to check the script itself).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dist_contrast_bench.common import default_out, package_version, sync, write_json

# dense bf16 peak, TFLOP/s, of the SXM parts (NVIDIA data sheets); matched on the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dist-contrast bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/image_text/clip_vit_b16.yaml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--min-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--loss-batches", default="65536,131072,262144")
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--smoke", action="store_true", help="tiny model and batches (script check)")
    p.add_argument("--out", default=default_out("gpu.json"))
    args = p.parse_args(argv)
    args.loss_batches = [int(x) for x in args.loss_batches.split(",")]
    return args


def build(args: argparse.Namespace, dev: torch.device):
    from dist_contrast.config import load_config
    from dist_contrast.methods import build_method

    over = ["data.tokenizer=bytes", "data.tokenizer_path="]
    if args.smoke:
        over += ["model.encoder=vit_tiny", "text.width=64", "text.layers=1", "text.heads=2"]
    cfg = load_config(args.config, over)
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


def fits(method, opt, cfg, n: int, dev: torch.device) -> bool:
    try:
        train_step(method, opt, batch_of(cfg, n, dev), dev)
        sync(dev)
        return True
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return False
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(method, opt, cfg, args, dev: torch.device) -> int:
    best, n = 0, args.min_batch
    while n <= args.max_batch and fits(method, opt, cfg, n, dev):
        best, n = n, 2 * n
    if best == 0:
        raise SystemExit(f"a micro-batch of {args.min_batch} does not fit on {dev}")
    print(f"  largest micro-batch that fits (doubling from {args.min_batch}): {best}")
    return best


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


def loss_memory(n: int, tiled: bool, tile: int, dev: torch.device) -> float | str:
    """Extra peak GiB of the CLIP loss forward + backward over its inputs, or "OOM"."""
    from dist_contrast.losses import clip_loss

    try:
        img = torch.randn(n, 512, device=dev, requires_grad=True)
        txt = torch.randn(n, 512, device=dev, requires_grad=True)
        scale = torch.tensor(2.6593, device=dev, requires_grad=True)
        sync(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        loss = clip_loss(img, txt, scale, memory_efficient=tiled, tile=tile if tiled else None)
        loss.backward()
        sync(dev)
        if dev.type != "cuda":
            return float("nan")
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**30
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def device_info(dev: torch.device) -> tuple[str, float | None]:
    if dev.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (use a GPU machine, or --device cpu --smoke)")
        return 2
    if args.smoke:
        args.min_batch, args.max_batch, args.steps, args.warmup = 2, 4, 2, 1
        args.loss_batches, args.tile = [256, 512], 128
    torch.backends.cuda.matmul.allow_tf32 = True
    name, peak = device_info(dev)
    peak = args.peak_tflops or peak
    cfg, method = build(args, dev)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4, fused=dev.type == "cuda")
    m, t = cfg.model, cfg.text
    print(f"CLIP {m.encoder}/{m.patch_size} + text {t.layers}x{t.width} on {name}")
    n = largest_batch(method, opt, cfg, args, dev)
    flops = step_flops(method, opt, cfg, n, dev)
    times = sorted(time_steps(method, opt, cfg, n, args, dev))
    median = times[len(times) // 2]
    achieved = flops / median / 1e12
    mfu = achieved / peak if peak else None
    print(
        f"  step {1e3 * median:.1f} ms at micro-batch {n}: {n / median:.0f} samples/s, "
        f"{achieved:.0f} TFLOP/s" + (f", MFU {100 * mfu:.1f}% of {peak:.0f}" if mfu else "")
    )
    del method, opt
    memory = []
    for nb in args.loss_batches:
        row = {"global_batch": nb}
        for form, tiled in (("local", False), ("tiled", True)):
            row[f"{form}_gib"] = loss_memory(nb, tiled, args.tile, dev)
        print(f"  loss memory N={nb}: local {row['local_gib']}, tiled {row['tiled_gib']} (GiB)")
        memory.append(row)
    result = {
        "device": name,
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "config": args.config,
        "smoke": args.smoke,
        "micro_batch": n,
        "step_ms_median": 1e3 * median,
        "step_ms": [1e3 * t for t in times],
        "flops_per_step": flops,
        "tflops_achieved": achieved,
        "peak_tflops_bf16": peak,
        "mfu": mfu,
        "loss_memory": memory,
        "loss_tile": args.tile,
        "command": "dist-contrast bench gpu " + " ".join(argv or []),
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
