"""Tiled vs full-matrix in-batch InfoNCE on W ranks: forward+backward time and peak memory per rank.

    dist-contrast bench negatives [--world 2] [--dim 512] [--compare 16384] [--large 65536]
                                  [--series 1024,...,65536] [--repeats 3] [--quick]

W processes (gloo on CPU, NCCL where there is a GPU per rank) each hold B/W query-key pairs and
run ``info_nce`` with the keys of every rank gathered with gradient (the local loss, logits
[B/W, B]): once on the full-matrix path and once with ``memory_efficient=True`` (the tiled
softmax of ``dist_contrast.negatives.tiled``), in the same run, alternating, so the ratios
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

If ``bench/negatives_queue.py`` exists, its ``queue_rows(quick)`` (the sharded MoCo queue) is
run after the ranks finish and printed as a second table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 2**20
GIB = 2**30
THRESHOLDS = {"memory_ratio_max": 0.1, "time_ratio_max": 1.5, "large_extra_gib_max": 1.5}
DEFAULT_SERIES = "1024,2048,4096,8192,16384,32768,65536"


# --------------------------------------------------------------------------------------------
# One rank (a process of its own, started by main)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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

    _sync(q.device)
    dist.barrier()
    start = time.perf_counter()
    _loss(q, k, mode, plan).backward()
    _sync(q.device)
    q.grad = k.grad = None
    return time.perf_counter() - start


def _peak_step(q, k, mode: str, plan: dict) -> tuple[int | None, float]:
    """(peak tensor bytes above the pre-step allocation, wall seconds) of one step."""
    dev = q.device
    if dev.type == "cuda":
        _sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        seconds = _step(q, k, mode, plan)
        return torch.cuda.max_memory_allocated(dev) - base, seconds
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        seconds = _step(q, k, mode, plan)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, RuntimeError):  # a torch without these profiler internals
        return None, seconds
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, seconds


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
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        procs, outs, logs = [], [], []
        for rank in range(world):
            out, log = Path(tmp) / f"rank{rank}.json", Path(tmp) / f"rank{rank}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(plan_path)]
            cmd += ["--worker-out", str(out)]
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            with log.open("w") as f:
                procs.append(
                    subprocess.Popen(
                        cmd, env=rank_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT
                    )
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
    p.add_argument("--out", default="bench/results/negatives.json")
    p.add_argument("--plot", default="bench/results/negatives_memory.png")
    p.add_argument("--quick", action="store_true", help="small sizes (B <= 1024, D 32), 1 repeat")
    p.add_argument("--no-queue", action="store_true", help="skip bench/negatives_queue.py")
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


def would_need_bytes(b_global: int, world: int) -> int:
    """Full-matrix memory per rank, analytically: logits, softmax and gradient in fp32."""
    return 4 * (b_global // world) * b_global * 3


def _summarise(plan: dict, per_rank: list[list[dict]], world: int) -> list[dict]:
    """One row per (case, mode): the slowest rank's step time, the largest rank's peak."""
    rows = []
    for i, case in enumerate(plan["cases"]):
        for mode in case["modes"]:
            steps = list(zip(*(r[i]["times"][mode] for r in per_rank), strict=True))
            slowest = [max(s) * 1e3 for s in steps]
            peaks = [r[i]["peaks"][mode] for r in per_rank]
            peak = None if None in peaks else max(peaks)
            rows.append(
                {
                    "role": case["role"],
                    "B": case["B"],
                    "B_local": case["B"] // world,
                    "path": mode,
                    "ms": statistics.median(slowest),
                    "ms_min": min(slowest),
                    "timed_steps": len(slowest),
                    "time_profiled": per_rank[0][i]["timed_profiled"],
                    "peak_mib": None if peak is None else peak / MIB,
                    "would_need_mib": would_need_bytes(case["B"], world) / MIB,
                }
            )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _acceptance(rows: list[dict], args: argparse.Namespace) -> dict:
    full = next(r for r in rows if r["role"] == "compare" and r["path"] == "full")
    tiled = next(r for r in rows if r["role"] == "compare" and r["path"] == "tiled")
    large = next(r for r in rows if r["role"] == "large")
    memory_ratio = _ratio(tiled["peak_mib"], full["peak_mib"])
    time_ratio = _ratio(tiled["ms"], full["ms"])
    extra_gib = None if large["peak_mib"] is None else large["peak_mib"] * MIB / GIB
    return {
        "compare_B": args.compare,
        "memory_ratio": memory_ratio,
        "time_ratio": time_ratio,
        "time_ratio_min": _ratio(tiled["ms_min"], full["ms_min"]),
        "large_B": args.large,
        "large_extra_gib": extra_gib,
        "large_would_need_gib": large["would_need_mib"] * MIB / GIB,
        **THRESHOLDS,
        "memory_ok": memory_ratio is not None and memory_ratio <= THRESHOLDS["memory_ratio_max"],
        "time_ok": time_ratio is not None and time_ratio <= THRESHOLDS["time_ratio_max"],
        "large_ok": extra_gib is not None and extra_gib <= THRESHOLDS["large_extra_gib_max"],
    }


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _table(rows: list[dict], acc: dict, header: str) -> str:
    lines = [
        header,
        f"{'row':<8} {'B':>6} {'B/W':>6} {'path':<6} {'median ms':>10} {'min ms':>9} "
        f"{'peak MiB':>9} {'full would need MiB':>20}",
    ]
    order = {"compare": 0, "large": 1, "series": 2}
    for r in sorted(rows, key=lambda r: (order[r["role"]], r["B"], r["path"])):
        ms = _fmt(r["ms"], ".0f") + ("*" if r["time_profiled"] else "")
        lines.append(
            f"{r['role']:<8} {r['B']:>6} {r['B_local']:>6} {r['path']:<6} {ms:>10} "
            f"{_fmt(r['ms_min'], '.0f'):>9} {_fmt(r['peak_mib'], '.1f'):>9} "
            f"{r['would_need_mib']:>20.0f}"
        )
    lines.append("* one profiled step (time includes the profiler's overhead)")
    ok = {True: "ok", False: "NOT MET"}
    lines.append(
        f"B={acc['compare_B']}: tiled/full peak memory {_fmt(acc['memory_ratio'], '.3f')} "
        f"(<= {acc['memory_ratio_max']}: {ok[acc['memory_ok']]}), "
        f"time {_fmt(acc['time_ratio'], '.2f')}x median, {_fmt(acc['time_ratio_min'], '.2f')}x "
        f"min (<= {acc['time_ratio_max']}: {ok[acc['time_ok']]})"
    )
    lines.append(
        f"B={acc['large_B']}: tiled extra {_fmt(acc['large_extra_gib'], '.2f')} GiB per rank "
        f"(<= {acc['large_extra_gib_max']}: {ok[acc['large_ok']]}); the full matrix would need "
        f"{acc['large_would_need_gib']:.1f} GiB"
    )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path_name, style in (("full", "o-"), ("tiled", "s-")):
        pts = sorted(
            (r["B"], r["peak_mib"])
            for r in rows
            if r["path"] == path_name and r["peak_mib"] is not None
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{path_name} (measured)")
    sizes = sorted({r["B"] for r in rows})
    need = [next(r["would_need_mib"] for r in rows if r["B"] == b) for b in sizes]
    ax.plot(sizes, need, "k--", label="full, would need (4 B x B/W x B x 3)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size B")
    ax.set_ylabel("peak extra memory per rank (MiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _queue_rows(quick: bool) -> tuple[list[dict] | None, str | None]:
    """Rows of ``bench/negatives_queue.py`` if that file exists: (rows, error)."""
    path = HERE / "negatives_queue.py"
    if not path.is_file():
        return None, None
    try:
        spec = importlib.util.spec_from_file_location("bench_negatives_queue", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return list(module.queue_rows(quick)), None
    except Exception as exc:  # its own failure, reported beside this benchmark's results
        return None, f"{type(exc).__name__}: {exc}"


def _queue_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["sharded MoCo queue (bench/negatives_queue.py)"]
    lines.append(" ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    lines += [" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {threads} thread(s) per rank, {os.cpu_count()} cores"


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
        print(f"bench/negatives_queue.py failed: {queue_error}", file=sys.stderr)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if queue_error else 0


if __name__ == "__main__":
    raise SystemExit(main())
