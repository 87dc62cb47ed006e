"""Samples/s of the training loader next to a plain webdataset + PIL pipeline doing the same work.

    dist-contrast bench loader [--workers 1,2,4] [--images 2000] [--image-size 224]
                               [--batch-size 64] [--epochs 2] [--repeats 3] [--data DIR]
                               [--quick]

Data: ``--images`` synthetic 256x256 JPEGs (smooth multi-scale noise, quality 90, about 23 KB
each, like a resized natural image) in shards of ``--shard-size`` samples with ``jpg``, ``cls``
and ``json`` ({"index": i}), written once per run into a temporary folder (or ``--data DIR``,
reused when it already holds ``train-*.tar``).

Both pipelines do the same work per sample and deliver the same batches: read the tar shards
(split over the loader workers), shuffle in a buffer of ``--shuffle-buffer`` samples, decode the
JPEG to RGB, cut two random resized crops (area 0.08-1, aspect 3/4-4/3) resampled bilinearly to
``--image-size`` with a horizontal flip at p=0.5, as uint8 [3, S, S], in full batches of
``--batch-size`` (two views [B, 3, S, S] uint8 + labels), handed by a torch DataLoader with
``--workers`` worker processes to this process.

- ours: ``dist_contrast.data.loader.train_loader``, as in training: in its workers, Pillow
  decodes once per image and torch resizes each whole-pixel crop (anti-aliased bilinear, uint8).
- baseline: ``webdataset.WebDataset(urls, shardshuffle=...).shuffle(n).decode("pil")``, the crop
  box chosen as torchvision's RandomResizedCrop does, ``img.resize(size, BILINEAR, box=...)``,
  ``transpose`` for the flip, ``.batched(B)``, ``DataLoader(batch_size=None)``.

Timing: per worker count, ``--repeats`` rounds; in each, ours and then the baseline (the order
alternates between rounds) run alone, never both at once: a fresh loader reads one untimed
warm-up epoch, then ``--epochs`` epochs of its steady stream are timed, the way a training run
meets them: ours' workers live across epochs, the baseline's DataLoader starts its workers again
at each epoch (its default). samples/s = samples delivered / wall seconds; the figure shown is
the median over the rounds, and ours/baseline is the median of the per-round ratios (the two
runs of a round are back to back, so load from other processes hits both about equally). CPU
ms/sample counts user+sys time of this process and of the loader workers over the timed epochs:
on a busy machine it is the steadier measure of the work done per sample.

Not in the loader figures: the per-pixel ops (colour jitter, grayscale, blur, solarize). Ours runs
them batched on the training device (``DeviceAugment``, kornia); their cost on this CPU is
measured as a separate row. The baseline here does none.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from dist_contrast_bench.common import (
    cpu_model,
    default_out,
    package_version,
    sync,
    usable_cores,
    write_json,
)
from dist_contrast_bench.loader_data import SOURCE_SIZE, existing_shards, write_shards
from dist_contrast_bench.loader_pipelines import (
    FLIP_PROB,
    PIPELINES,
    RATIO,
    SCALE,
    SIMCLR_PIXEL_OPS,
    Baseline,
    Ours,
    TwoViews,
    _checked,
    configs,
    rrc_box,
)

__all__ = ["Baseline", "Ours", "TwoViews", "rrc_box"]


def _children_cpu() -> float | None:
    """User+sys seconds of this process' live children (loader workers), from /proc."""
    me, ticks, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for pid in entries:
        try:
            fields = Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _cpu_seconds() -> float | None:
    """User+sys seconds of this process and of its children, live or joined."""
    live = _children_cpu()
    if live is None:
        return None
    me, gone = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + gone.ru_utime + gone.ru_stime + live


def _wait_for_workers(timeout: float = 30.0) -> None:
    """Until the loader workers of a finished measurement have exited."""
    end = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < end:
        time.sleep(0.05)


def run_once(name: str, urls: list[str], args: argparse.Namespace, workers: int) -> dict:
    """One warm-up epoch (it gives the batches per epoch), then ``args.epochs`` timed epochs of
    the pipeline's steady stream; the pipeline's workers have exited when this returns."""
    size, batch_size = args.image_size, args.batch_size
    pipe = PIPELINES[name](urls, args, workers)
    per_epoch = sum(1 for b in pipe.epoch() if _checked(b, size, batch_size))
    stream = pipe.stream()
    cpu, start = _cpu_seconds(), time.perf_counter()
    samples = sum(
        _checked(b, size, batch_size) for b in itertools.islice(stream, per_epoch * args.epochs)
    )
    wall, cpu_end = time.perf_counter() - start, _cpu_seconds()
    stream.close()
    del stream, pipe
    gc.collect()
    _wait_for_workers()
    cpu_s = None if cpu is None or cpu_end is None else cpu_end - cpu
    return {"samples": samples, "seconds": wall, "cpu_seconds": cpu_s}


def measure(urls: list[str], args: argparse.Namespace, workers: int) -> list[dict]:
    """Rows for ours and the baseline at ``workers``: ``args.repeats`` rounds, each running one
    pipeline then the other (alternating which goes first), never both at once."""
    rounds: dict[str, list[dict]] = {name: [] for name in PIPELINES}
    for r in range(args.repeats):
        order = list(PIPELINES) if r % 2 == 0 else list(reversed(PIPELINES))
        for name in order:
            rounds[name].append(run_once(name, urls, args, workers))
    rates = {name: [x["samples"] / x["seconds"] for x in rounds[name]] for name in rounds}
    paired = [o / b for o, b in zip(rates["ours"], rates["baseline"], strict=True)]
    rows = []
    for name, runs in rounds.items():
        ours = name == "ours"
        cpu = [1e3 * x["cpu_seconds"] / x["samples"] for x in runs if x["cpu_seconds"] is not None]
        rows.append(
            {
                "pipeline": name,
                "workers": workers,
                "samples_per_s": statistics.median(rates[name]),
                "samples_per_s_best": max(rates[name]),
                "samples_per_s_rounds": rates[name],
                "cpu_ms_per_sample": statistics.median(cpu) if cpu else None,
                "samples_timed": runs[0]["samples"],
                "ours_over_baseline": statistics.median(paired) if ours else None,
                "ours_over_baseline_rounds": paired if ours else None,
                "ours_over_baseline_best": (
                    max(rates["ours"]) / max(rates["baseline"]) if ours else None
                ),
            }
        )
    return rows


def device_augment(urls: list[str], args: argparse.Namespace) -> dict:
    """Ours' per-pixel ops (SimCLR strengths) on one batch of two views, on ``args.device``."""
    from dist_contrast.data.augment import DeviceAugment

    dev = torch.device(args.device)
    data, augment = configs(args, urls, 0)
    aug = DeviceAugment(augment, data).to(dev)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batch = {
        key: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(dev)
        for key in ("view1", "view2")
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(args.aug_threads if dev.type == "cpu" else threads)
    try:
        times = []
        for step in range(1 + args.repeats):  # one untimed call first
            sync(dev)
            start = time.perf_counter()
            aug(batch, seed=step)
            sync(dev)
            if step >= 1:
                times.append(time.perf_counter() - start)
        name = device_name(dev)
    finally:
        torch.set_num_threads(threads)
    ms = statistics.median(times) * 1e3
    return {
        "device": name,
        "batch_size": args.batch_size,
        "ms_per_batch": ms,
        "ms_per_batch_rounds": [t * 1e3 for t in times],
        "samples_per_s": args.batch_size / (ms / 1e3),
        "ops": SIMCLR_PIXEL_OPS,
    }


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"CPU, {threads} torch thread{'s' if threads > 1 else ''}"


def machine() -> dict:
    return {"cpu": cpu_model(), "cores_usable": usable_cores(), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------
# Command line


def _ints(text: str, what: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s]
    except ValueError:
        p.error(f"{what} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 0:
        p.error(f"{what} must be non-negative integers, got {text!r}")
    return values


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench loader", description=__doc__.strip().splitlines()[0]
    )
    p.add_argument("--workers", default="1,2,4", help="loader worker counts, comma-separated")
    p.add_argument("--images", type=int, default=2000, help="synthetic 256x256 JPEGs to write")
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    p.add_argument("--image-size", type=int, default=224, help="output views, S x S")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after 1 warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each pipeline (rounds)")
    p.add_argument("--data", help="shard folder to reuse (written there if it has none)")
    p.add_argument("--device", default="auto", help="device of the per-pixel row: auto/cpu/cuda")
    p.add_argument(
        "--aug-threads",
        type=int,
        default=1,
        help="torch threads of the per-pixel row on CPU (default 1: the cost per core)",
    )
    p.add_argument("--out", default=default_out("loader.json"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="200 images, shards of 25, views 128, B 16, 1 epoch, 1 repeat",
    )
    raw = list(argv)
    args = p.parse_args(raw)
    if args.quick:
        given = {a.split("=", 1)[0] for a in raw}
        quick = {"images": 200, "shard_size": 25, "image_size": 128, "batch_size": 16}
        quick.update(epochs=1, repeats=1)
        for key, value in quick.items():  # explicit options win over --quick
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    args.workers = _ints(args.workers, "--workers", p)
    sizes = (args.images, args.shard_size, args.image_size, args.batch_size, args.epochs)
    if min(*sizes, args.repeats) < 1:
        p.error(
            "--images, --shard-size, --image-size, --batch-size, --epochs and --repeats "
            "must be >= 1"
        )
    if args.aug_threads < 1:
        p.error("--aug-threads must be >= 1")
    if args.shuffle_buffer < 0:
        p.error("--shuffle-buffer must be >= 0")
    shards = math.ceil(args.images / args.shard_size)
    if args.data is None and shards < max(max(args.workers), 1):
        p.error(f"{shards} shard(s) for {max(args.workers)} workers: lower --shard-size")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.command = "dist-contrast bench loader " + " ".join(raw)
    return args


def _shards(args: argparse.Namespace, tmp: str) -> tuple[list[str], str]:
    folder = Path(args.data) if args.data else Path(tmp)
    urls = existing_shards(folder)
    if urls:
        return urls, f"reused {len(urls)} shard(s) in {folder}"
    start = time.perf_counter()
    urls = write_shards(folder, args.images, args.shard_size)
    took = time.perf_counter() - start
    return urls, f"wrote {args.images} images in {len(urls)} shard(s) in {took:.1f} s"


def _table(rows: list[dict], aug: dict, header: str) -> str:
    lines = [
        header,
        f"{'':>7} {'samples/s (median)':>20}   {'ours / baseline samples/s':>29}   "
        f"{'CPU ms/sample':>17}",
        f"{'workers':>7} {'ours':>9} {'baseline':>10}   {'median':>7} {'rounds':>12} "
        f"{'best':>8}   {'ours':>8} {'baseline':>8}   {'ours not slower':>15}",
    ]
    for w in sorted({r["workers"] for r in rows}):
        o = next(r for r in rows if r["workers"] == w and r["pipeline"] == "ours")
        b = next(r for r in rows if r["workers"] == w and r["pipeline"] == "baseline")
        ratio, per = o["ours_over_baseline"], o["ours_over_baseline_rounds"]
        spread = f"{min(per):.2f}..{max(per):.2f}"
        lines.append(
            f"{w:>7} {o['samples_per_s']:>9.1f} {b['samples_per_s']:>10.1f}   {ratio:>7.2f} "
            f"{spread:>12} {o['ours_over_baseline_best']:>8.2f}   "
            f"{_ms(o['cpu_ms_per_sample']):>8} {_ms(b['cpu_ms_per_sample']):>8}   "
            f"{'yes' if ratio >= 1.0 else 'NO':>15}"
        )
    lines.append(
        f"per-pixel ops of ours (DeviceAugment: jitter 0.8 x 0.4/0.4/0.4/0.1, grayscale 0.2, "
        f"blur 0.5, solarize 0.2; 2 views of B={aug['batch_size']}) on {aug['device']}: "
        f"{aug['ms_per_batch']:.1f} ms/batch = {aug['samples_per_s']:.1f} samples/s "
        "(main process; on a GPU run this is on the device)"
    )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _header(args: argparse.Namespace, urls: list[str], cpu: dict, load: tuple) -> str:
    header = (
        f"loader samples/s: {args.epochs} epoch(s) after 1 warm-up epoch, median of "
        f"{args.repeats} run(s) of each; "
        f"{len(urls)} shards, {args.images} JPEGs {SOURCE_SIZE}px -> 2 views {args.image_size}px "
        f"uint8, B={args.batch_size}, shuffle {args.shuffle_buffer}\n"
        "includes: tar read, shuffle, JPEG decode, 2 crops + flip, collate, IPC, worker starts "
        "(baseline: each epoch; ours: once); excludes the per-pixel ops (row below)\n"
        "ours/base: median and range of the per-round ratios (paired runs), and best/best; "
        "CPU ms/sample: user+sys of all the loader's processes, median over rounds\n"
        f"{cpu['cpu']}, {cpu['cores_usable']} cores, torch {torch.__version__}, "
        f"load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    if max(args.workers) > cpu["cores_usable"]:
        header += f" (more workers than cores at {max(args.workers)} workers)"
    return header


def _result(args: argparse.Namespace, made: str, load: tuple, rows: list, aug: dict) -> dict:
    settings = ("images", "shard_size", "image_size", "batch_size", "shuffle_buffer")
    settings += ("epochs", "repeats", "workers")
    return {
        "machine": machine(),
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "webdataset": package_version("webdataset"),
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "data": made,
        "settings": {k: getattr(args, k) for k in settings}
        | {"source_size": SOURCE_SIZE, "scale": SCALE, "ratio": RATIO, "flip_prob": FLIP_PROB},
        "timing": "samples delivered / wall seconds of the timed epochs after one warm-up epoch "
        "(ours: workers live across epochs; baseline: default DataLoader, workers restart per "
        "epoch); median over rounds; ratio = median of per-round ours/baseline; CPU = user+sys "
        "seconds of this process and its worker processes per sample",
        "command": args.command,
        "results": rows,
        "device_augment": aug,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()
    # More workers than cores is part of what is measured; torch's warning about it is noise.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        urls, made = _shards(args, tmp)
        print(made, flush=True)
        rows = []
        for w in args.workers:
            rows.extend(measure(urls, args, w))
            print(f"  measured {w} worker(s)", flush=True)
        aug = device_augment(urls, args)
    print(_table(rows, aug, _header(args, urls, machine(), load_before)))
    result = _result(args, made, load_before, rows, aug)
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
