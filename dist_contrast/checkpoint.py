"""Checkpoint layout of a run: ``checkpoints/step_XXXXXXXX/`` directories written by DeepSpeed,
and a ``latest`` pointer written last (temp file + rename) after every rank has finished, so a
crash mid-save leaves the previous checkpoint loadable and ``latest`` pointing at it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from dist_contrast import distributed
from dist_contrast.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


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


def save(engine, root: Path, step: int, keep: int, rank_state: dict | None = None) -> Path:
    """All ranks write their part of step ``step`` (DeepSpeed's files, and each rank its own
    ``rank_XXXXX.pt``: data position, queue shard); then rank 0 moves ``latest`` and prunes."""
    tag = step_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    if rank_state is not None:
        path = rank_file(root / tag, distributed.rank())
        tmp = path.with_suffix(".tmp")
        torch.save(rank_state, tmp)
        os.replace(tmp, path)
    distributed.barrier()
    if distributed.is_main():
        _write_latest(root, tag)
        _prune(root, keep)
    distributed.barrier()
    return root / tag


def load_rank_state(step_dir: Path, rank: int) -> dict | None:
    """What this rank saved with the checkpoint, or None (another world size, an old run)."""
    path = rank_file(step_dir, rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


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
