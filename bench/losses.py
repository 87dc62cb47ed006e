"""Forward + backward time and peak memory of every objective in dist_contrast.losses.

    dist-contrast bench losses [--sizes 256,1024,4096] [--dim 128] [--repeats 5] [--quick]
    python -m dist_contrast_bench.losses [--quick]

One process, no gather. Time: the median and the minimum over ``--repeats`` timed
forward+backward passes after ``--warmup`` untimed ones (on a shared machine the minimum is the
steadier figure). Memory: the peak of tensor bytes allocated during one forward+backward
pass above what was allocated before it (inputs excluded): on CUDA from
``torch.cuda.max_memory_allocated``, on CPU by replaying the allocation and free events the
PyTorch profiler records (``profile_memory=True``). Both count tensors only, not the allocator's
cache or the process' other memory. Labels come in classes of 4 samples (B/4 classes); the
ratio column is the time over NT-Xent's at the same B, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from dist_contrast import losses as L
from dist_contrast_bench.common import (
    cpu_model,
    default_out,
    profiled_peak_bytes,
    sync,
    write_json,
)

SAMPLES_PER_CLASS = 4
QUEUE = 4096  # InfoNCE queue / NCE noise samples (InstDisc's K)


def _cases() -> dict[str, tuple[Callable[[dict], torch.Tensor], tuple[str, ...]]]:
    """name -> (call on an input dict, names of the inputs it needs)."""
    return {
        "contrastive": (lambda t: L.contrastive_loss(t["x"], t["labels"]), ("x", "labels")),
        "triplet_all": (lambda t: L.triplet_loss(t["x"], t["labels"]), ("x", "labels")),
        "triplet_batch_hard": (
            lambda t: L.triplet_loss(t["x"], t["labels"], mining="batch-hard"),
            ("x", "labels"),
        ),
        "triplet_semi_hard": (
            lambda t: L.triplet_loss(t["x"], t["labels"], mining="semi-hard"),
            ("x", "labels"),
        ),
        "npair": (lambda t: L.n_pair_loss(t["x"], t["labels"]), ("x", "labels")),
        "angular": (lambda t: L.angular_loss(t["x"], t["labels"]), ("x", "labels")),
        "infonce_in_batch": (lambda t: L.info_nce(t["a"], t["b"]), ("a", "b")),
        "infonce_queue": (
            lambda t: L.info_nce(t["a"], t["b"], t["queue"]),
            ("a", "b", "queue"),
        ),
        "ntxent": (lambda t: L.nt_xent(t["a"], t["b"]), ("a", "b")),
        "supcon": (
            lambda t: L.supcon_loss(t["views"], t["labels"]),
            ("views", "labels"),
        ),
        "clip": (lambda t: L.clip_loss(t["a"], t["b"], t["scale"]), ("a", "b", "scale")),
        "siglip": (
            lambda t: L.siglip_loss(t["a"], t["b"], t["scale"], t["bias"]),
            ("a", "b", "scale", "bias"),
        ),
        "dcl": (lambda t: L.dcl_loss(t["a"], t["b"]), ("a", "b")),
        "dclw": (lambda t: L.dcl_loss(t["a"], t["b"], sigma=0.5), ("a", "b")),
        "nce": (
            lambda t: L.nce_loss(t["a"], t["b"], t["queue"], n_data=1_281_167, z=1e5),
            ("a", "b", "queue"),
        ),
        "byol": (lambda t: L.byol_loss(t["a"], t["b"], t["b"], t["a"]), ("a", "b")),
    }


def _inputs(names, b: int, dim: int, dev: torch.device, queue: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    make = {
        "x": lambda: torch.randn(b, dim, generator=g),
        "a": lambda: torch.randn(b, dim, generator=g),
        "b": lambda: torch.randn(b, dim, generator=g),
        "views": lambda: torch.randn(b, 2, dim, generator=g),
        "queue": lambda: torch.randn(queue, dim, generator=g),
        "scale": lambda: torch.tensor(2.0),
        "bias": lambda: torch.tensor(-10.0),
        "labels": lambda: torch.arange(b) // SAMPLES_PER_CLASS,
    }
    out = {}
    for n in names:
        t = make[n]().to(dev)
        out[n] = t.requires_grad_(True) if t.is_floating_point() and n != "queue" else t
    return out


def _step(call, inputs) -> None:
    call(inputs).backward()
    for t in inputs.values():
        t.grad = None


def _time_ms(call, inputs, repeats: int, dev: torch.device) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        _step(call, inputs)
        sync(dev)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def _peak_bytes(call, inputs, dev: torch.device) -> int | None:
    if dev.type == "cuda":
        sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        _step(call, inputs)
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _step(call, inputs)
    except (AttributeError, RuntimeError):  # a torch without these profiler internals
        return None
    return profiled_peak_bytes(prof)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench losses", description=__doc__.strip().splitlines()[0]
    )
    p.add_argument("--sizes", default="256,1024,4096", help="batch sizes, comma-separated")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed passes (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    p.add_argument("--queue", type=int, default=QUEUE, help="negatives of InfoNCE / NCE")
    p.add_argument("--losses", default="", help="only these, comma-separated")
    p.add_argument("--out", default=default_out("losses.json"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quick", action="store_true", help="B in {16, 32}, D 16, queue 64, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.dim, args.repeats, args.queue, args.warmup = "16,32", 16, 1, 64, 1
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 2 or min(args.dim, args.repeats, args.queue) < 1:
        p.error("--sizes must be >= 2; --dim, --repeats and --queue >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = _cases()
    args.losses = [n for n in args.losses.split(",") if n] or list(cases)
    unknown = sorted(set(args.losses) - set(cases))
    if unknown:
        p.error(f"unknown loss {unknown[0]!r}; choose from {', '.join(cases)}")
    return args


def run(args: argparse.Namespace, dev: torch.device) -> list[dict]:
    cases = _cases()
    rows = []
    for b in args.sizes:
        for name in args.losses:
            call, needs = cases[name]
            inputs = _inputs(needs, b, args.dim, dev, args.queue)
            for _ in range(args.warmup):
                _step(call, inputs)
            ms, ms_min = _time_ms(call, inputs, args.repeats, dev)
            peak = _peak_bytes(call, inputs, dev)
            rows.append({"loss": name, "B": b, "ms": ms, "ms_min": ms_min, "peak_mib": _mib(peak)})
            del inputs
    for r in rows:
        ref = next((x for x in rows if x["loss"] == "ntxent" and x["B"] == r["B"]), None)
        r["x_ntxent"] = r["ms"] / ref["ms"] if ref and ref["ms"] > 0 else None
    return rows


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        f"{'loss':<20} {'B':>6} {'median ms':>10} {'min ms':>9} {'x ntxent':>9} {'peak MiB':>9}",
    ]
    order = {name: i for i, name in enumerate(_cases())}
    for r in sorted(rows, key=lambda r: (order[r["loss"]], r["B"])):
        ratio = "-" if r["x_ntxent"] is None else f"{r['x_ntxent']:.2f}"
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"{r['loss']:<20} {r['B']:>6} {r['ms']:>10.2f} {r['ms_min']:>9.2f} {ratio:>9} {peak:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    dev = torch.device(args.device)
    rows = run(args, dev)
    memory = "peak tensor bytes above the pre-step allocation, " + (
        "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "CPU profiler events"
    )
    header = (
        f"dist_contrast.losses, one process, D={args.dim}, K={args.queue}, "
        f"{args.repeats} repeats, "
        f"{device_name(dev)}, torch {torch.__version__}\n"
        f"peak MiB = {memory}"
    )
    print(_table(rows, header))
    result = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "dim": args.dim,
        "queue": args.queue,
        "repeats": args.repeats,
        "samples_per_class": SAMPLES_PER_CLASS,
        "time": "wall ms of forward+backward: median and min over the repeats",
        "memory": memory,
        "command": "dist-contrast bench losses " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": rows,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
