"""Sharded MoCo queue vs a replicated one, W = 1, 2, 4 gloo processes on this machine.

    dist-contrast bench negatives_queue [--quick] [--k-shard 16384] [--dim 128] [--batch 256]
                                        [--worlds 1,2,4] [--repeats 9] [--warmup 2]

Each rank holds K_shard keys of a queue of K_total = W x K_shard (``ShardedQueue``: enqueue its
own keys only, score through the distributed log-sum-exp) and, side by side in the same
processes, a replicated queue of the same K_total (every rank holds all K_total keys; the keys
of every rank are all-gathered on enqueue; each rank scores its B queries against its copy).
A step is InfoNCE forward + backward of B queries per rank (leaf tensors standing in for an
encoder) + enqueue of B keys; sharded and replicated steps alternate (which of the two goes
first alternates too: the second of a pair ran measurably slower on this machine). Both score
with the same kernel (``dist_contrast.negatives.local_logsumexp``), so the ratio is the price
of sharding: the query gather, the combine of the per-shard log-sum-exps and their backward
collectives, against the replicated queue's all-gather of keys on enqueue. Time: per step the
slowest rank's wall time (all_reduce MAX), median and minimum over ``--repeats`` steps after
``--warmup``, and the median of the ratios of adjacent sharded/replicated steps (the steadier
figure on a shared machine). Memory: bytes of the queue each rank holds (fp32). Each rank runs
max(1, cores // W) intra-op threads; with W above the core count the ranks share cores (the
table says so), which slows both queues alike but inflates the communication waits.
"""

from __future__ import annotations

import argparse
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

from dist_contrast_bench.common import default_out, usable_cores, write_json

TEMPERATURE = 0.2


# --------------------------------------------------------------------------------------------
# One rank (run as `python -m dist_contrast_bench.negatives_queue --worker ...` under a gloo
# process group)


class ReplicatedQueue:
    """The baseline: every rank holds all K_total keys; enqueue all-gathers every rank's keys."""

    def __init__(self, dim: int, size: int, seed: int) -> None:
        from dist_contrast.negatives.rows import unit_rows

        self.keys = unit_rows(torch.arange(size), dim, seed, torch.float32)
        self.ptr = 0

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        from dist_contrast.distributed import all_gather_no_grad
        from dist_contrast.losses.kernels.numerics import normalize

        rows = all_gather_no_grad(normalize(keys))
        slots = (self.ptr + torch.arange(rows.shape[0])) % self.keys.shape[0]
        self.keys.index_copy_(0, slots, rows)
        self.ptr = (self.ptr + rows.shape[0]) % self.keys.shape[0]

    def info_nce(self, q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
        """The same loss as ``ShardedQueue.info_nce``, with the same scoring kernel
        (``local_logsumexp``), on this rank's queries against its full copy: no collective."""
        from dist_contrast.losses.kernels.numerics import fp32_region, normalize
        from dist_contrast.negatives import local_logsumexp

        with fp32_region():
            qn, kn = normalize(q), normalize(k)
            pos = (qn * kn).sum(dim=1) / temperature
            lse = torch.logaddexp(pos, local_logsumexp(qn, self.keys, temperature))
            return (lse - pos).mean()


def _timed_step(queue, b: int, dim: int, gen: torch.Generator) -> float:
    import torch.distributed as dist

    q = torch.randn(b, dim, generator=gen, requires_grad=True)
    k = torch.randn(b, dim, generator=gen)
    dist.barrier()
    start = time.perf_counter()
    queue.info_nce(q, k, TEMPERATURE).backward()
    queue.enqueue(k)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from dist_contrast.negatives import ShardedQueue

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    sharded = ShardedQueue(args.dim, world * args.k_shard, seed=0)
    replicated = ReplicatedQueue(args.dim, world * args.k_shard, seed=0)
    gen = torch.Generator().manual_seed(1 + rank)
    times: dict[str, list[float]] = {"sharded": [], "replicated": []}
    pair = (("sharded", sharded), ("replicated", replicated))
    for i in range(args.warmup + args.repeats):
        for name, queue in pair if i % 2 == 0 else pair[::-1]:  # who goes first alternates
            t = _timed_step(queue, args.batch, args.dim, gen)
            if i >= args.warmup:
                times[name].append(t)
    if rank == 0:
        out = {
            "sharded_bytes": sharded.shard_bytes,
            "replicated_bytes": replicated.keys.numel() * replicated.keys.element_size(),
            "negatives_per_query": sharded.negatives_per_query,
            "times": times,
        }
        Path(args.result).write_text(json.dumps(out))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The driver


def _launch(world, threads, result: Path, k_shard, dim, batch, repeats, warmup) -> dict:
    """W worker processes of this module under one gloo group; rank 0's measurements."""
    from dist_contrast.distributed import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "dist_contrast_bench.negatives_queue", "--worker"]
    cmd += ["--result", str(result)]
    cmd += ["--k-shard", str(k_shard), "--dim", str(dim), "--batch", str(batch)]
    cmd += ["--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(world)]
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode for p in procs):  # one rank failed: the others would hang
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(f"a rank of the W={world} run failed (exit codes {codes})")
    return json.loads(result.read_text())


def _run_world(world: int, k_shard: int, dim: int, batch: int, repeats: int, warmup: int):
    threads = max(1, usable_cores() // world)
    with tempfile.TemporaryDirectory() as tmp:
        out = _launch(
            world, threads, Path(tmp) / "rank0.json", k_shard, dim, batch, repeats, warmup
        )
    t_s, t_r = out["times"]["sharded"], out["times"]["replicated"]
    ms = {name: 1000 * statistics.median(t) for name, t in out["times"].items()}
    return {
        "W": world,
        "K_shard": k_shard,
        "K_total": world * k_shard,
        "B": batch,
        "D": dim,
        "threads_per_rank": threads,
        "oversubscribed": world > usable_cores(),
        "negatives_per_query": out["negatives_per_query"],
        "queue_bytes_sharded": out["sharded_bytes"],
        "queue_bytes_replicated": out["replicated_bytes"],
        "ms_sharded": ms["sharded"],
        "ms_replicated": ms["replicated"],
        "ms_min_sharded": 1000 * min(t_s),
        "ms_min_replicated": 1000 * min(t_r),
        "time_ratio": ms["sharded"] / ms["replicated"],
        "time_ratio_min": min(t_s) / min(t_r),
        "time_ratio_paired": statistics.median(a / b for a, b in zip(t_s, t_r, strict=True)),
    }


def queue_rows(quick: bool, **overrides) -> list[dict]:
    """The table rows (one per W). ``quick``: K_shard 1024, D 32, B 32, W in {1, 2}, 5 steps."""
    opts = {"worlds": (1, 2, 4), "k_shard": 16384, "dim": 128, "batch": 256}
    opts.update(repeats=9, warmup=2)
    if quick:
        opts.update(worlds=(1, 2), k_shard=1024, dim=32, batch=32, repeats=5, warmup=2)
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return [
        _run_world(w, opts["k_shard"], opts["dim"], opts["batch"], opts["repeats"], opts["warmup"])
        for w in opts["worlds"]
    ]


def _table(rows: list[dict]) -> str:
    lines = [
        f"{'W':>2} {'K_total':>8} {'neg/query':>9} {'queue MiB/rank':>15} {'sharded ms':>11} "
        f"{'replic. ms':>11} {'ratio':>6} {'r(min)':>6} {'r(pair)':>7}  note",
    ]
    for r in rows:
        mib = f"{r['queue_bytes_sharded'] / 2**20:.1f} vs {r['queue_bytes_replicated'] / 2**20:.1f}"
        note = f"{r['threads_per_rank']} thr/rank"
        if r["oversubscribed"]:
            note += f", {r['W']} ranks on {usable_cores()} cores: oversubscribed"
        lines.append(
            f"{r['W']:>2} {r['K_total']:>8} {r['negatives_per_query']:>9} {mib:>15} "
            f"{r['ms_sharded']:>11.1f} {r['ms_replicated']:>11.1f} {r['time_ratio']:>6.2f} "
            f"{r['time_ratio_min']:>6.2f} {r['time_ratio_paired']:>7.2f}  {note}"
        )
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dist-contrast bench negatives_queue", description=__doc__)
    p.add_argument("--quick", action="store_true", help="K_shard 1024, D 32, B 32, W 1,2")
    p.add_argument("--worlds", help="comma-separated W (default 1,2,4)")
    p.add_argument("--k-shard", type=int, help="keys per rank (default 16384)")
    p.add_argument("--dim", type=int, help="key dimension (default 128)")
    p.add_argument("--batch", type=int, help="queries per rank (default 256)")
    p.add_argument("--repeats", type=int, help="timed steps (default 9)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2)")
    p.add_argument("--out", default=default_out("negatives_queue.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return 0
    worlds = tuple(int(w) for w in args.worlds.split(",")) if args.worlds else None
    rows = queue_rows(
        args.quick,
        worlds=worlds,
        k_shard=args.k_shard,
        dim=args.dim,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    header = (
        f"sharded vs replicated MoCo queue, K_shard={rows[0]['K_shard']}, D={rows[0]['D']}, "
        f"B={rows[0]['B']} per rank, gloo on {usable_cores()} CPU cores "
        f"({platform.processor() or '?'}),"
        f" torch {torch.__version__}\nstep = InfoNCE fwd+bwd + enqueue; ms = median over steps of "
        "the slowest rank; ratio = sharded / replicated (same K_total, same run): of the\n"
        "medians, of the minima, and the median of the ratios of adjacent (paired) steps"
    )
    print(header)
    print(_table(rows))
    result = {
        "cores": usable_cores(),
        "torch": torch.__version__,
        "time": "per step the slowest rank's wall ms (InfoNCE fwd+bwd + enqueue); median, min; "
        "time_ratio_paired: median over steps of sharded / replicated of adjacent steps",
        "memory": "bytes of the queue one rank holds (fp32 keys)",
        "notes": "W above the core count oversubscribes the CPU (ranks share cores)",
        "command": "dist-contrast bench negatives_queue " + " ".join(argv),
        "results": rows,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
