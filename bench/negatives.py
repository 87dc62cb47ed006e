"""Tiled vs full-matrix in-batch InfoNCE on W ranks: forward+backward time and peak memory per rank.

    dist-contrast bench negatives [--world 2] [--dim 512] [--compare 16384] [--large 65536]
                                  [--series 1024,...,65536] [--repeats 3] [--quick]

W processes (gloo on CPU, NCCL where there is a GPU per rank) each hold B/W query-key pairs and
run ``info_nce`` with the keys of every rank gathered with gradient (the local loss, logits
[B/W, B]): once on the full-matrix path and once with ``memory_efficient=True`` (the tiled
softmax of ``dist_contrast.losses.kernels.tiled``), in the same run, alternating, so the ratios
compare like with like. Rows:

- ``--compare`` (global B 16,384): both paths; time = median (and min) over ``--repeats``
  forward+backward steps after ``--warmup`` untimed ones, each step's time the slowest rank's;
  peak memory per rank; ratios tiled / full.
- ``--large`` (global B 65,536): the tiled path only, one step; its peak extra memory per rank
  beside what the full matrix would need, ``4 bytes x B/W x B x 3`` (logits, softmax, gradient).
- ``--series``: peak memory of both paths against B (the full one up to ``--full-max``),
  plotted to ``--plot`` (PNG).

Memory: the peak of tensor bytes allocated during one step above what was allocated before it
(the inputs excluded), the maximum over ranks: on CUDA ``torch.cuda.max_memory_allocated``, on
CPU by replaying the allocation and free events of the PyTorch profiler
(``profile_memory=True``). Tensors only: not the allocator's cache, nor the rest of the process.

Unless ``--no-queue``, ``queue_rows(quick)`` of ``dist_contrast_bench.negatives_queue`` (the
sharded MoCo queue) is run after the ranks finish and printed as a second table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_contrast_bench.common import (
    cpu_model,
    default_out,
    profiled_peak_bytes,
    sync,
    write_json,
)
from dist_contrast_bench.negatives_report import _acceptance, _plot, _summarise, _table

QUEUE_MODULE = "dist_contrast_bench.negatives_queue"
DEFAULT_SERIES = "1024,2048,4096,8192,16384,32768,65536"


# --------------------------------------------------------------------------------------------
# One rank (a process of its own, started by main)


def _loss(q, k, mode: str, plan: dict) -> torch.Tensor:
    from dist_contrast import losses as L

    return L.info_nce(
        q,
        k,
        temperature=plan["temperature"],
        gather_mode="all",
        memory_efficient=mode == "tiled",
        tile=plan["tile"],
    )


def _step(q, k, mode: str, plan: dict) -> float:
    """One forward+backward; wall seconds from a barrier to the end of this rank's backward."""
    import torch.distributed as dist

    sync(q.device)
    dist.barrier()
    start = time.perf_counter()
    _loss(q, k, mode, plan).backward()
    sync(q.device)
    q.grad = k.grad = None
    return time.perf_counter() - start


def _peak_step(q, k, mode: str, plan: dict) -> tuple[int | None, float]:
    """(peak tensor bytes above the pre-step allocation, wall seconds) of one step."""
    dev = q.device
    if dev.type == "cuda":
        sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        seconds = _step(q, k, mode, plan)
        return torch.cuda.max_memory_allocated(dev) - base, seconds
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        seconds = _step(q, k, mode, plan)
    return profiled_peak_bytes(prof), seconds


def _inputs(b_global: int, dim: int, rank: int, world: int, dev: torch.device):
    g = torch.Generator().manual_seed(1000 * b_global + rank)
    n = b_global // world
    q = torch.randn(n, dim, generator=g).to(dev).requires_grad_(True)
    k = torch.randn(n, dim, generator=g).to(dev).requires_grad_(True)
    return q, k


def _run_case(case: dict, plan: dict, rank: int, world: int, dev: torch.device) -> dict:
    q, k = _inputs(case["B"], plan["dim"], rank, world, dev)
    modes = case["modes"]
    for _ in range(case["warmup"]):
        for mode in modes:
            _step(q, k, mode, plan)
    times = {mode: [] for mode in modes}
    for _ in range(case["repeats"]):
        for mode in modes:  # alternating: the same load on the machine for both
            times[mode].append(_step(q, k, mode, plan))
    peaks = {}
    for mode in modes:
        peak, seconds = _peak_step(q, k, mode, plan)
        peaks[mode] = peak
        if not case["repeats"]:
            times[mode].append(seconds)
    return {"times": times, "peaks": peaks, "timed_profiled": not case["repeats"]}


def worker(plan_path: str, out_path: str) -> None:
    """Entry of one rank: the launcher's environment names rank and world."""
    from dist_contrast import distributed

    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(plan["threads"])
    if plan["device"] == "cuda":
        torch.cuda.set_device(int(os.environ["RANK"]) % torch.cuda.device_count())
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    dev = distributed.device() if plan["device"] == "cuda" else torch.device("cpu")
    results = [_run_case(case, plan, rank, world, dev) for case in plan["cases"]]
    Path(out_path).write_text(json.dumps(results))
    distributed.shutdown()


# --------------------------------------------------------------------------------------------
# The launcher


def _launch(plan: dict, world: int, timeout: float) -> list[list[dict]]:
    """Run the plan on ``world`` local processes; each rank's results."""
    from dist_contrast.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="bench_negatives_") as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        env = dict(os.environ)
        for key in ("SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK"):
            env.pop(key, None)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS=str(plan["threads"]),
        )
        procs, outs, logs = [], [], []
        for rank in range(world):
            out, log = Path(tmp) / f"rank{rank}.json", Path(tmp) / f"rank{rank}.log"
            cmd = [sys.executable, "-m", "dist_contrast_bench.negatives", "--worker"]
            cmd += [str(plan_path), "--worker-out", str(out)]
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            with log.open("w") as f:
                procs.append(
                    subprocess.Popen(cmd, env=rank_env, stdout=f, stderr=subprocess.STDOUT)
                )
            outs.append(out)
            logs.append(log)
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for rank, log in enumerate(logs):
                _echo(rank, log)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"benchmark rank(s) {failed} failed (output above)")
        return [json.loads(out.read_text()) for out in outs]


def _echo(rank: int, log: Path) -> None:
    """A rank's output, less the profiler's start/stop lines."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "USDT:" not in ln]
    for line in lines:
        print(f"[rank {rank}] {line}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Plan, summary, tables


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench negatives", description=__doc__.strip().splitlines()[0]
    )
    p.add_argument("--world", type=int, default=2, help="ranks W")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    p.add_argument("--compare", type=int, default=16384, help="global B of the side-by-side row")
    p.add_argument("--large", type=int, default=65536, help="global B of the tiled-only row")
    p.add_argument("--series", default=DEFAULT_SERIES, help="global B of the memory plot")
    p.add_argument("--full-max", type=int, default=16384, help="largest B of the full path")
    p.add_argument("--tile", type=int, default=None, help="tile of the tiled path (its default)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--repeats", type=int, default=2, help="timed steps of the compare row")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (a GPU per rank)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    p.add_argument("--out", default=default_out("negatives.json"))
    p.add_argument("--plot", default=default_out("negatives_memory.png"))
    p.add_argument("--quick", action="store_true", help="small sizes (B <= 1024, D 32), 1 repeat")
    p.add_argument("--no-queue", action="store_true", help="skip the sharded-queue rows")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.compare, args.large, args.series, args.full_max = 256, 1024, "128,256,512,1024", 256
        args.dim, args.repeats, args.warmup = 32, 1, 0
        args.tile = args.tile or 64
    try:
        args.series = sorted({int(s) for s in args.series.split(",") if s.strip()})
    except ValueError:
        p.error(f"--series must be comma-separated integers, got {args.series!r}")
    sizes = [args.compare, args.large, *args.series]
    if args.world < 1 or any(b < args.world or b % args.world for b in sizes):
        p.error(f"every batch size must be a multiple of --world {args.world}")
    if min(args.dim, args.threads) < 1 or args.repeats < 0 or args.warmup < 0:
        p.error("--dim and --threads must be >= 1, --repeats and --warmup >= 0")
    if args.tile is not None and args.tile < 1:
        p.error("--tile must be >= 1")
    if args.device == "auto":
        enough = torch.cuda.is_available() and torch.cuda.device_count() >= args.world
        args.device = "cuda" if enough else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(
            f"--device cuda needs a GPU per rank ({args.world}), found {torch.cuda.device_count()}"
        )
    return args


def _plan(args: argparse.Namespace) -> dict:
    """The same list of cases for every rank (collectives must match)."""
    cases = [
        {
            "role": "compare",
            "B": args.compare,
            "modes": ["full", "tiled"],
            "repeats": args.repeats,
            "warmup": args.warmup,
        }
    ]
    for b in args.series:
        if b in (args.compare, args.large):
            continue
        modes = ["full", "tiled"] if b <= args.full_max else ["tiled"]
        cases.append({"role": "series", "B": b, "modes": modes, "repeats": 0, "warmup": 0})
    cases.append({"role": "large", "B": args.large, "modes": ["tiled"], "repeats": 0, "warmup": 0})
    return {
        "cases": cases,
        "dim": args.dim,
        "tile": args.tile,
        "temperature": args.temperature,
        "threads": args.threads,
        "device": args.device,
    }


def _queue_rows(quick: bool) -> tuple[list[dict] | None, str | None]:
    """Rows of ``queue_rows(quick)`` of ``QUEUE_MODULE``: (rows, None), or (None, error)."""
    try:
        module = importlib.import_module(QUEUE_MODULE)
        return list(module.queue_rows(quick)), None
    except Exception as exc:  # its own failure, reported beside this benchmark's results
        return None, f"{type(exc).__name__}: {exc}"


def _queue_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["sharded MoCo queue (dist-contrast bench negatives_queue)"]
    lines.append(" ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    lines += [" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {cpu_model()}, {threads} thread(s) per rank, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.worker:
        worker(args.worker, args.worker_out)
        return 0
    plan = _plan(args)
    start = time.perf_counter()
    rows = _summarise(plan, _launch(plan, args.world, args.timeout), args.world)
    acc = _acceptance(rows, args)
    backend = "nccl" if args.device == "cuda" else "gloo"
    device = device_name(args.device, args.threads)
    tile = args.tile or "default (1024)"
    header = (
        f"in-batch InfoNCE, local loss (logits B/W x B), W={args.world} ({backend}), "
        f"D={args.dim}, tile={tile}, {device}, torch {torch.__version__}\n"
        "time: forward+backward, slowest rank; peak MiB: tensor bytes above the pre-step "
        "allocation, largest rank"
    )
    print(_table(rows, acc, header))
    plot = _plot(
        rows,
        Path(args.plot),
        f"in-batch InfoNCE, W={args.world}, D={args.dim}, tile={tile}, {device}",
    )
    if plot:
        print(f"wrote {plot}")
    queue, queue_error = (None, None) if args.no_queue else _queue_rows(args.quick)
    if queue:
        print(_queue_table(queue))
    if queue_error:
        print(f"{QUEUE_MODULE} failed: {queue_error}", file=sys.stderr)
    result = {
        "device": device,
        "torch": torch.__version__,
        "backend": backend,
        "world": args.world,
        "dim": args.dim,
        "tile": args.tile,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "time": "wall ms of forward+backward from a barrier, the slowest rank: median and min",
        "memory": "peak tensor bytes above the pre-step allocation (inputs excluded), the "
        "largest rank: "
        + (
            "torch.cuda.max_memory_allocated"
            if args.device == "cuda"
            else "CPU profiler memory events"
        ),
        "would_need": "4 bytes x B/W x B x 3 (logits, softmax, gradient in fp32)",
        "command": "dist-contrast bench negatives " + " ".join(argv),
        "seconds": time.perf_counter() - start,
        "acceptance": acc,
        "results": rows,
        "plot": plot,
        "queue": queue,
        "queue_error": queue_error,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 1 if queue_error else 0


if __name__ == "__main__":
    raise SystemExit(main())
