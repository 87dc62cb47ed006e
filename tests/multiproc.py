"""Run a function on W local ranks (gloo on localhost, a free port) and collect the results."""

from __future__ import annotations

import io
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from dist_contrast.distributed import free_port


def _worker(rank: int, world: int, port: int, env: dict, fn: Callable, args: tuple, queue) -> None:
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        buf = io.BytesIO()  # tensors travel as bytes: no shared memory outliving the child
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, the parent re-raises
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Ranks are forked from a fork server that imported these once: a spawned rank spent 1.5-2 s
# of CPU importing torch (and DeepSpeed) before its first line, for every rank of every test.
# The server is a fresh single-threaded process (no thread or process group of the test run
# is inherited), and each rank still starts its own gloo group on a free port.
# A rank sees the test's environment as it is when the ranks start (the server's dates from
# its own start): it is handed over and set first.
PRELOAD = [
    "torch",
    "torch.distributed",
    "deepspeed",
    "dist_contrast.distributed",
    "tests.multiproc",
]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; the list of their return values
    (rank order). A failure on any rank raises with that rank's traceback."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world, port, dict(os.environ), fn, args, queue), daemon=True
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
