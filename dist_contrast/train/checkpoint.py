"""Checkpoint layout of a run: ``checkpoints/step_XXXXXXXX/`` directories and a ``latest``
pointer.

A save is never written in place: every rank writes its part (DeepSpeed's files and its own
``rank_XXXXX.pt``) into ``.tmp_step_XXXXXXXX/``; after a barrier, rank 0 renames it to
``step_XXXXXXXX/``, then moves ``latest`` (temp file + rename), then prunes. A process killed
anywhere in that sequence leaves the previous checkpoint complete and ``latest`` pointing at it;
a half-written ``.tmp_*`` directory is never read, and the next save removes it.

A checkpoint resumes on another number of ranks through DeepSpeed's universal checkpoint: the
ZeRO partitions of ``step_XXXXXXXX/`` are consolidated once (per parameter: fp32 weights, Adam's
moments and step) into the sibling ``step_XXXXXXXX_universal/``, written the same way (temporary
directory, then a rename) and reused by later resumes; each rank then takes its new partition of
it. The step directory itself is never changed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
# ZeRO 1-3 partitions; ``bf16_`` ones are DeepSpeed's BF16 optimizer (ZeRO-1 with bf16)
ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_")
UNIVERSAL_SUFFIX = "_universal"
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
    for path in root.glob(f"step_*{UNIVERSAL_SUFFIX}"):  # conversions of pruned checkpoints
        if not (root / path.name.removesuffix(UNIVERSAL_SUFFIX)).is_dir():
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


def _zero_ranks(step_dir: Path) -> list[int]:
    """The ranks whose ZeRO partitions ``step_dir`` holds (``zero_pp_rank_R_*`` files)."""
    return sorted({int(m.group(1)) for p in step_dir.iterdir() if (m := ZERO_FILE.match(p.name))})


def zero_world(step_dir: Path) -> int | None:
    """The number of ranks whose ZeRO partitions ``step_dir`` holds; None for a checkpoint
    without partitions (ZeRO stage 0)."""
    return len(_zero_ranks(step_dir)) or None


def check_world(step_dir: Path, world: int) -> None:
    """Refuse, before any rank starts, what cannot resume on ``world`` ranks: partitions of
    some ranks missing, or a checkpoint written by another number of ranks that cannot be
    converted (no universal conversion beside it, and its folder is not writable)."""
    ranks = _zero_ranks(step_dir)
    if ranks != list(range(len(ranks))):
        raise CheckpointError(
            f"{step_dir} holds the ZeRO partitions of ranks {ranks} only: it is incomplete"
        )
    saved = len(ranks)
    if saved in (0, world):
        return
    if not universal_dir(step_dir).is_dir() and not os.access(step_dir.parent, os.W_OK):
        raise CheckpointError(
            f"{step_dir} holds ZeRO partitions of {saved} rank(s); this job has {world}: the "
            f"conversion to {world} rank(s) is written beside it, in {step_dir.parent}, which is "
            f"not writable (copy the step directory somewhere writable and resume from there)"
        )


def universal_dir(step_dir: Path) -> Path:
    """Where the universal conversion of ``step_dir`` lives: DeepSpeed's ``load_dir``, holding
    a tag of the step directory's name."""
    return step_dir.parent / f"{step_dir.name}{UNIVERSAL_SUFFIX}"


def _convert_universal(step_dir: Path) -> Path:
    """Consolidate the ZeRO partitions of ``step_dir`` into a universal checkpoint (rank 0;
    the others wait at the barrier); an earlier conversion is reused."""
    final = universal_dir(step_dir)
    if distributed.is_main() and not final.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = final.with_name(TMP_PREFIX + final.name)
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(step_dir),
            output_folder=str(tmp / step_dir.name),
            num_extract_workers=1,  # in this process: no pool of workers to outlive it
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # a model without tensor parallelism: none to record
        )
        log = io.StringIO()  # its progress lines and bars: a failure is said in one line
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as exc:  # its asserts and file errors: one line for the user
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not convert {step_dir} to a universal checkpoint for another number "
                f"of ranks: {type(exc).__name__}: {exc}"
            ) from None
        os.replace(tmp, final)
    distributed.barrier()
    return final


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
    (``step``, ``data``, ...).

    Partitions written by as many ranks as this job has load as they are (bit-exact). Written
    by another number, they are loaded from the universal conversion: the fp32 weights, Adam's
    ``exp_avg``/``exp_avg_sq`` and step of every parameter, cut into this job's partitions."""
    saved = zero_world(step_dir)
    if saved is None or saved == distributed.world_size():
        path, client = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:
        path, client = _load_universal(engine, step_dir)
    if path is None or client is None:
        raise CheckpointError(f"could not load the checkpoint in {step_dir}")
    return client


def _load_universal(engine, step_dir: Path) -> tuple[str | None, dict | None]:
    """``engine.load_checkpoint`` from the universal conversion of ``step_dir``. DeepSpeed reads
    its ``checkpoint.load_universal`` setting at load time only: it is set for this load."""
    root = _convert_universal(step_dir)
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(str(root), tag=step_dir.name)
    finally:
        config.load_universal_checkpoint = before
    _restore_group_settings(engine, root / step_dir.name)
    return path, client


def _restore_group_settings(engine, converted: Path) -> None:
    """Each optimizer group's settings (weight decay, ``adapt``, ...) as saved: DeepSpeed's
    ZeRO-3 universal load gives every group those of the first (0.19.8), which would decay the
    biases and norms that :func:`~dist_contrast.train.optim.param_groups` leaves undecayed."""
    saved = torch.load(converted / "zero" / "optimizer_state.pt", weights_only=False)
    groups = engine.optimizer.optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(
            f"{converted} holds {len(saved['param_groups'])} optimizer group(s); the optimizer "
            f"of this job has {len(groups)}"
        )
    for group, settings in zip(groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in settings.items() if k != "params"})


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
