"""Checkpoint layout of a run: ``checkpoints/step_XXXXXXXX/`` directories and a ``latest``
pointer.

A save is never written in place: every rank writes its part (DeepSpeed's files and its own
``rank_XXXXX.pt``) into ``.tmp_step_XXXXXXXX/``; after a barrier, rank 0 renames it to
``step_XXXXXXXX/``, then moves ``latest`` (temp file + rename), then prunes. A process killed
anywhere in that sequence leaves the previous checkpoint complete and ``latest`` pointing at it;
a half-written ``.tmp_*`` directory is never read, and the next save removes it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dist_contrast import distributed
from dist_contrast.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
TMP_PREFIX = ".tmp_"
ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_")
# torch.save's RuntimeErrors on a failed write (seen on a full tmpfs: "basic_ios::clear:
# iostream error", then "unexpected pos N vs M" from the zip writer)
WRITE_FAILED = ("iostream error", "unexpected pos", "file write failed", "No space left")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(root: Path) -> list[Path]:
    """Complete or not, every step directory under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def read_latest(root: Path) -> Path | None:
    ptr = root / LATEST
    if not ptr.is_file():
        return None
    tag = ptr.read_text().strip()
    path = root / tag
    if not STEP_DIR.match(tag) or not path.is_dir():
        raise CheckpointError(f"{ptr} points at '{tag}', which is not a checkpoint directory")
    return path


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    latest = read_latest(root)
    old = [p for p in step_dirs(root) if p != latest]
    for path in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank_{rank:05d}.pt"


def _clear_partial(root: Path) -> None:
    """Remove the temporary directories of saves that never finished (a killed job)."""
    for path in root.glob(f"{TMP_PREFIX}step_*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def save(
    engine,
    root: Path,
    step: int,
    keep: int,
    rank_state: dict | None = None,
    client_state: dict | None = None,
) -> Path:
    """All ranks write their part of step ``step`` into a temporary directory (DeepSpeed's
    files, with ``client_state`` and ``step``; each rank its own ``rank_XXXXX.pt``: data
    position, queue shard, RNG); then rank 0 renames it, moves ``latest`` and prunes."""
    tag = step_tag(step)
    tmp_tag = TMP_PREFIX + tag
    if distributed.is_main():
        _clear_partial(root)
    distributed.barrier()
    client = {**(client_state or {}), "step": step}
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client, save_latest=False)
        if rank_state is not None:
            path = rank_file(root / tmp_tag, distributed.rank())
            tmp = path.with_suffix(".tmp")
            torch.save(rank_state, tmp)
            os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(root, tmp_tag, exc) from None
    except RuntimeError as exc:  # how torch.save's C++ writer reports a full disk
        # ... or that the partial folder is gone: a peer whose write failed removed it
        gone = not (root / tmp_tag).is_dir()
        if not (gone or any(m in str(exc) for m in WRITE_FAILED)) or distributed.peer_gone(exc):
            raise
        raise _write_failed(root, tmp_tag, exc) from None
    distributed.barrier()
    if distributed.is_main():
        final = root / tag
        if final.exists():  # left by a job killed before it moved `latest` there
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _write_latest(root, tag)
        _prune(root, keep)
    distributed.barrier()
    return root / tag


def _write_failed(root: Path, tmp_tag: str, exc: BaseException) -> CheckpointError:
    """The one line a rank ends with when it cannot write its part of a checkpoint (a full
    disk, a quota, a lost mount), after removing the partial folder: ``latest`` still names
    the previous checkpoint. Its peers, waiting in the checkpoint's barrier, see it leave."""
    shutil.rmtree(root / tmp_tag, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = getattr(exc, "strerror", None) or "the write failed"
    latest = read_latest(root)
    kept = f"latest is still {latest.name}" if latest else "no earlier checkpoint"
    return CheckpointError(
        f"could not write checkpoint {root / tmp_tag} ({reason}; {free}); {kept}"
    )


def rng_state() -> dict:
    """This process's random generators: Python, NumPy, torch CPU and CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rank_state(step_dir: Path, rank: int) -> dict | None:
    """What this rank saved with the checkpoint, or None (another world size, an old run)."""
    path = rank_file(step_dir, rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def zero_world(step_dir: Path) -> int | None:
    """The ranks whose ZeRO partitions ``step_dir`` holds (``zero_pp_rank_R_*`` files); None
    for a checkpoint without partitions (ZeRO stage 0)."""
    ranks = {m.group(1) for p in step_dir.iterdir() if (m := ZERO_FILE.match(p.name))}
    return len(ranks) or None


def check_world(step_dir: Path, world: int) -> None:
    """Refuse, before any rank starts, to resume partitions written by another number of ranks
    (DeepSpeed would fail after the ranks start, in 60 lines around ZeRORuntimeException)."""
    saved = zero_world(step_dir)
    if saved is not None and saved != world:
        raise CheckpointError(
            f"{step_dir} holds ZeRO partitions of {saved} rank(s); this job has {world}: resume "
            f"it on {saved} rank(s) (resuming on another world size is not supported yet)"
        )


def resolve_resume(root: Path, spec: str) -> Path | None:
    """The step directory ``checkpoint.resume`` names: '' -> None (fresh run), 'latest' -> the
    one ``latest`` points at (None if the run has none yet), else a path to a step directory."""
    if spec == "":
        return None
    if spec == LATEST:
        return read_latest(root)
    path = Path(spec)
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise CheckpointError(f"checkpoint.resume: '{spec}' is not a checkpoint step directory")
    return path


def load(engine, step_dir: Path) -> dict:
    """Restore model, optimizer and scheduler from ``step_dir``; return its client state
    (``step``, ``data``, ...)."""
    path, client = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
    if path is None or client is None:
        raise CheckpointError(f"could not load the checkpoint in {step_dir}")
    return client


def load_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained module, without starting DeepSpeed's engine.

    ZeRO 1-3 keep fp32 master weights partitioned in the optimizer states; they are
    consolidated with DeepSpeed's zero_to_fp32. ZeRO-0 keeps the module whole."""
    if not step_dir.is_dir():
        raise CheckpointError(f"no checkpoint directory at {step_dir}")
    if any(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        return {k: v.float() for k, v in state.items()}
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{step_dir} holds no model states")
    blob = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
