"""Process-group start, the collectives the losses need, and per-rank seeds.

Discovery of the launcher (torchrun, the DeepSpeed launcher, Slurm's srun, or none) lives here
and nowhere else. Models never import this module; losses and negatives use the collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

STALE_LOCK_S = 180.0  # a build of the shm op takes 20-60 s on 2 cores; a no-op check under 1 s


def clear_stale_build_locks(root: str, stale_s: float = STALE_LOCK_S, poll_s: float = 1.0) -> None:
    """Remove the ``lock`` files of torch's extension builds under ``root`` that no build holds.

    Every process that loads DeepSpeed's CPU comm op takes ``<root>/<op>/lock`` while ninja
    checks the build (torch's FileBaton: a plain file, no owner), and a process killed in that
    second (torchrun ending the ranks of a failed start) leaves it: every later start then waits
    on it forever. A lock ``stale_s`` old is left over (no build takes that long); a younger
    one is waited on until it goes or reaches that age."""
    for lock in sorted(Path(root).glob("*/lock")):
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # the build that held it finished
            if age >= stale_s:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                print(
                    f"dist-contrast: removed {lock}, left {age:.0f} s ago by a build that was "
                    "killed (it would make this start wait forever)",
                    file=sys.stderr,
                )
                break
            time.sleep(min(poll_s, stale_s - age))


def configure_accelerator() -> str:
    """Set ``DS_ACCELERATOR=cpu`` unless CUDA is usable or the user chose one; return it.

    Also, in a virtual environment, DeepSpeed's compiled ops (the CPU shared-memory comm op) go
    to ``<venv>/torch_extensions`` unless ``TORCH_EXTENSIONS_DIR`` is set: the default cache in
    the home directory is shared by every environment, so two clones rebuild it in turn, and a
    build killed half-way leaves a lock that makes every later start wait forever. The venv's
    ``bin`` goes first on ``PATH`` so that its ninja, not a system one, builds them."""
    venv = sys.prefix != sys.base_prefix
    if venv and "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if venv:  # the venv's ninja builds those ops whether or not the venv was activated: a
        # system ninja of another version reads the build log differently and rebuilds each time
        bin_dir = os.path.join(sys.prefix, "bin")
        path = os.environ.get("PATH", "").split(os.pathsep)
        if path[:1] != [bin_dir]:
            os.environ["PATH"] = os.pathsep.join([bin_dir, *[d for d in path if d != bin_dir]])
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("DS_ACCELERATOR") == "cpu" and "TORCH_EXTENSIONS_DIR" in os.environ:
        clear_stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    return os.environ.get("DS_ACCELERATOR", "cuda")


configure_accelerator()


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "deepspeed", "slurm" or "none"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-03,7],login1`` into host names."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment. torchrun and DeepSpeed set RANK/WORLD_SIZE (and win
    when they run inside a Slurm allocation); srun sets SLURM_PROCID/SLURM_NTASKS; with neither
    this is a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        launcher = "deepspeed" if "CROSS_RANK" in env or "DS_LAUNCHER" in env else "torchrun"
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher=launcher,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        ntasks = int(env["SLURM_NTASKS"])
        nnodes = max(1, int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1"))))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=max(1, ntasks // nnodes),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            # A port derived from the job id: the same on every node, different across jobs.
            master_port=int(env.get("MASTER_PORT") or 15000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "none")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(timeout_s: float = 600.0) -> DistEnv:
    """Start the default process group from the launcher's environment (idempotent)."""
    env = detect_env()
    if dist.is_available() and dist.is_initialized():
        return env
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend(),
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


# What a collective raises on a rank whose peer has gone (the peer's own error is the cause).
PEER_GONE = (
    "Connection closed by peer",  # gloo
    "Connection reset by peer",  # gloo
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",  # NCCL
)


def peer_gone(exc: BaseException) -> str | None:
    """What the collective said if ``exc`` is one failing because another rank has ended
    (secondary to that rank's own error, which says what went wrong), else None."""
    if isinstance(exc, RuntimeError):
        return next((s for s in PEER_GONE if s in str(exc)), None)
    return None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Rank helpers


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist() and world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (for logging)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device()).detach().clone()
    if is_dist() and world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return float(t)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (for counters)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if is_dist() and world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj`` (picklable plain data), in rank order, on every rank."""
    if not (is_dist() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool | torch.Tensor) -> bool:
    """True on every rank iff ``flag`` is true on every rank: one decision for all. A tensor
    flag stays on its device until the all-reduced answer is read: one host read."""
    t = torch.as_tensor(flag, device=device()).reshape(1).to(torch.int32)
    if is_dist() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


# --------------------------------------------------------------------------------------------
# all_gather with an exact backward


_equal_rows = False  # set by equal_rows(): a process-wide promise (backward may run elsewhere)


@contextlib.contextmanager
def equal_rows() -> Iterator[None]:
    """Within: every rank gives each gather the same number of rows as this rank (a training
    step over fixed per-rank batches: the loader drops partial ones), so the gathers do not
    exchange their sizes first: one collective and one host read fewer per gather. A rank
    whose rows differ would break the promise for all: the caller checks its batch first."""
    global _equal_rows
    before, _equal_rows = _equal_rows, True
    try:
        yield
    finally:
        _equal_rows = before


def _gather_sizes(n: int, dev: torch.device) -> list[int]:
    if _equal_rows:
        return [n] * world_size()
    size = torch.tensor([n], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0 (ranks may hold different numbers of rows).
    Backward: sum-reduce the incoming gradient over ranks and keep this rank's rows.

    With each rank's loss a mean over its local anchors and gradients averaged over ranks (as
    DeepSpeed does), W ranks then get the gradients of one process on the global batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        top = max(sizes)
        padded = x
        if x.shape[0] < top:
            pad = x.new_zeros((top - x.shape[0], *x.shape[1:]))
            padded = torch.cat([x, pad])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_offset(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from all ranks along dim 0 in rank order, with gradient, and return
    the offset of this rank's rows in the result (for labels and self-masks).

    On one process (or without a process group) it returns ``(x, 0)``."""
    if not is_dist() or world_size() == 1:
        return x, 0
    sizes = tuple(_gather_sizes(x.shape[0], x.device))
    return _AllGatherWithGrad.apply(x, sizes), sum(sizes[: rank()])


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 without gradient (labels, indices)."""
    with torch.no_grad():
        return all_gather_with_offset(x.detach())[0]


def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
):
    """``torch.distributed.all_gather_into_tensor``; on gloo (a blocking call, contiguous
    tensors of one dtype) as one broadcast per rank into the output's slices, in place.
    gloo's all-gather goes through a fresh flat buffer and a copy out of it: 39 ms for 36 MB
    on 2 ranks of the development VM, where the broadcasts take 12 (an all-reduce of the same
    36 MB: 23). Broadcasts move the bytes as they are: the result is the same to the bit."""
    world = dist.get_world_size(group)
    n = input_tensor.numel()
    if (
        async_op
        or dist.get_backend(group) != "gloo"
        or not output_tensor.is_contiguous()
        or output_tensor.dtype != input_tensor.dtype
        or output_tensor.numel() != n * world
    ):
        return dist.all_gather_into_tensor(
            output_tensor, input_tensor, group=group, async_op=async_op
        )
    flat, me = output_tensor.view(-1), dist.get_rank(group)
    mine = flat[me * n : (me + 1) * n]
    if mine.data_ptr() != input_tensor.data_ptr() or not input_tensor.is_contiguous():
        mine.copy_(input_tensor.reshape(-1))
    for i in range(world):
        src = i if group is None else dist.get_global_rank(group, i)
        dist.broadcast(flat[i * n : (i + 1) * n], src=src, group=group)
    return None


def multi_rank() -> bool:
    """A process group of more than one rank is running."""
    return is_dist() and world_size() > 1


_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across processes, unlike hash()): each part is
    folded in with a splitmix64 step. Pure integer arithmetic, about 2 us; it is called once per
    sample in the loader, where numpy's SeedSequence cost 0.1 ms (3% of a sample's work)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1
