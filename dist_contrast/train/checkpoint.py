"""Checkpoint layout of a run: ``checkpoints/step_XXXXXXXX/`` directories and a ``latest``
pointer.

A save is never written in place: every rank writes its part (DeepSpeed's files and its own
``rank_XXXXX.pt``) into ``.tmp_step_XXXXXXXX/``; after a barrier, rank 0 renames it to
``step_XXXXXXXX/``, then moves ``latest`` (temp file + rename), then prunes. A process killed
anywhere in that sequence leaves the previous checkpoint complete and ``latest`` pointing at it;
a half-written ``.tmp_*`` directory is never read, and the next save removes it.

Before the rename, the ranks hash the files (each its share) and rank 0 writes the step's
``manifest.json`` (:mod:`dist_contrast.train.manifest`): resume, evaluation and export verify a
step against it before they trust a byte of it, and name the damaged file and the newest intact
step when it fails. Every file is loaded with ``weights_only=True``
(:mod:`dist_contrast.train.deepspeed_api`): a file made to run code is refused, never run.

``checkpoint.resume``: ``latest`` takes the step ``latest`` names, and refuses it if it is
damaged or if ``latest`` is missing while step directories are there; ``latest_intact`` (what a
requeued Slurm job passes) takes the newest step that verifies and sets damaged newer ones aside
as ``step_N.damaged``; a path takes that step directory.

A checkpoint resumes on another number of ranks through DeepSpeed's universal checkpoint: the
ZeRO partitions of ``step_XXXXXXXX/`` are consolidated once (per parameter: fp32 weights, Adam's
moments and step) into the sibling ``step_XXXXXXXX_universal/``, written the same way (temporary
directory, then a rename) and reused by later resumes; each rank then takes its new partition of
it. The step directory itself is never changed; the conversion carries a manifest too, and a
damaged one is converted again.

A reader (``dist-contrast eval``/``export`` of a running job) pins the step it reads
(:mod:`dist_contrast.train.pins`): pruning leaves a pinned step for a later save.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from dist_contrast import distributed
from dist_contrast.errors import CheckpointError
from dist_contrast.train import deepspeed_api, manifest, pins

STEP_DIR = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
LATEST_INTACT = "latest_intact"
TMP_PREFIX = ".tmp_"
DAMAGED_SUFFIX = ".damaged"
# ZeRO 1-3 partitions; ``bf16_`` ones are DeepSpeed's BF16 optimizer (ZeRO-1 with bf16)
ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_")
UNIVERSAL_SUFFIX = "_universal"
# torch.save's RuntimeErrors on a failed write (seen on a full tmpfs: "basic_ios::clear:
# iostream error", then "unexpected pos N vs M" from the zip writer)
WRITE_FAILED = ("iostream error", "unexpected pos", "file write failed", "No space left")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_number(step_dir: Path) -> int:
    return int(STEP_DIR.match(step_dir.name).group(1))


def step_dirs(root: Path) -> list[Path]:
    """Complete or not, every step directory under ``root``, oldest first (a link to a folder
    elsewhere is not one: nothing is read from outside the run)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()
    )


def read_latest(root: Path) -> Path | None:
    """The step directory ``latest`` names; None when there is no ``latest`` file."""
    ptr = root / LATEST
    if not ptr.is_file() or ptr.is_symlink():
        if ptr.is_symlink() or ptr.exists():
            raise CheckpointError(f"{ptr} is not a regular file")
        return None
    if ptr.stat().st_size > 4096:
        raise CheckpointError(f"{ptr} is damaged (not a step name)")
    tag = ptr.read_text(errors="replace").strip()
    path = root / tag
    if not STEP_DIR.match(tag) or not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"{ptr} points at '{tag}', which is not a checkpoint directory")
    return path


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    """Remove the oldest step directories beyond ``keep`` (never ``latest``, never one a
    reader has pinned: a later save removes it), then the conversions and pins they leave."""
    latest = read_latest(root)
    old = [p for p in step_dirs(root) if p != latest]
    for path in old[: max(0, len(old) - (keep - 1))]:
        if not pins.is_pinned(path):
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f"step_*{UNIVERSAL_SUFFIX}"):  # conversions of pruned checkpoints
        if not (root / path.name.removesuffix(UNIVERSAL_SUFFIX)).is_dir():
            shutil.rmtree(path, ignore_errors=True)
    pins.clear_stale(root)


def rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank_{rank:05d}.pt"


def _clear_partial(root: Path) -> None:
    """Remove the temporary directories of saves that never finished (a killed job)."""
    for path in root.glob(f"{TMP_PREFIX}step_*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ---- saving ---------------------------------------------------------------------------------


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
    position, queue shard, RNG); the ranks hash the files into its manifest; then rank 0
    renames it, moves ``latest`` and prunes."""
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
    try:
        seal(root / tmp_tag, step)
    except OSError as exc:
        raise _write_failed(root, tmp_tag, exc) from None
    if distributed.is_main():
        final = root / tag
        if final.exists():  # left by a job killed before it moved `latest` there
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _write_latest(root, tag)
        _prune(root, keep)
    distributed.barrier()
    return root / tag


def seal(folder: Path, step: int | None = None) -> None:
    """Every rank hashes its share of the files of ``folder``; rank 0 writes the manifest. A
    collective: every rank calls it, after the files are written."""
    names = manifest.files_of(folder)
    mine = manifest.shares(folder, names, distributed.world_size())[distributed.rank()]
    parts = distributed.all_gather_object(manifest.hash_files(folder, mine))
    if distributed.is_main():
        manifest.write(folder, {k: v for part in parts for k, v in part.items()}, step)
    distributed.barrier()


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
    """This process's random generators: Python, NumPy, torch CPU and CUDA. NumPy's state is
    kept as plain data and a tensor, so that the file loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
        )
    else:  # the tuple NumPy gives, in rank files of earlier versions
        np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rank_state(step_dir: Path, rank: int) -> dict | None:
    """What this rank saved with the checkpoint, or None (another world size, an old run)."""
    path = rank_file(step_dir, rank)
    if not path.is_file():
        return None
    state = deepspeed_api.load(path)
    if not isinstance(state, dict) or not {"world", "data", "method"} <= set(state):
        raise CheckpointError(f"{path} is not a rank state of a dist-contrast checkpoint")
    return state


# ---- loading --------------------------------------------------------------------------------


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
    """Consolidate the ZeRO partitions of ``step_dir`` (verified by the caller) into a
    universal checkpoint with its manifest (rank 0 converts, every rank hashes its share); an
    earlier conversion is reused if it verifies, else made again. A collective."""
    final = universal_dir(step_dir)
    if final.is_dir() and not _damaged(final):
        return final
    tmp = final.with_name(TMP_PREFIX + final.name)
    if distributed.is_main():
        if final.is_dir():
            print(
                f"dist-contrast: {final} is damaged or incomplete: converted again",
                file=sys.stderr,
                flush=True,
            )
            shutil.rmtree(final)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            deepspeed_api.convert_universal(step_dir, tmp)
        except CheckpointError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    distributed.barrier()
    seal(tmp)
    if distributed.is_main():
        os.replace(tmp, final)
    distributed.barrier()
    return final


def _damaged(folder: Path) -> bool:
    """Whether a universal conversion fails its manifest (or has none: cut short)."""
    try:
        listed = manifest.read(folder)
    except CheckpointError:
        return True
    return listed is None or bool(manifest.verify_folder(folder, listed))


def load(engine, step_dir: Path) -> dict:
    """Restore model, optimizer and scheduler from ``step_dir`` (verified by the caller:
    :func:`dist_contrast.train.integrity.choose`); return its client state (``step``, ``data``,
    ...). Every file is loaded with ``weights_only=True``.

    Partitions written by as many ranks as this job has load as they are (bit-exact). Written
    by another number, they are loaded from the universal conversion: the fp32 weights, Adam's
    ``exp_avg``/``exp_avg_sq`` and step of every parameter, cut into this job's partitions."""
    saved = zero_world(step_dir)
    if saved is None or saved == distributed.world_size():
        path, client = deepspeed_api.load_checkpoint(engine, step_dir.parent, step_dir.name)
    else:
        root = _convert_universal(step_dir)
        path, client = deepspeed_api.load_universal(engine, root, step_dir.name)
        _restore_group_settings(engine, root / step_dir.name)
    if path is None or client is None:
        raise CheckpointError(f"could not load the checkpoint in {step_dir}")
    return client


def _restore_group_settings(engine, converted: Path) -> None:
    """Each optimizer group's settings (weight decay, ``adapt``, ...) as saved: DeepSpeed's
    ZeRO-3 universal load gives every group those of the first (0.19.8), which would decay the
    biases and norms that :func:`~dist_contrast.train.optim.param_groups` leaves undecayed."""
    saved = deepspeed_api.load(converted / "zero" / "optimizer_state.pt")
    groups = engine.optimizer.optimizer.param_groups
    if not isinstance(saved, dict) or len(saved.get("param_groups", ())) != len(groups):
        found = len(saved.get("param_groups", ())) if isinstance(saved, dict) else 0
        raise CheckpointError(
            f"{converted} holds {found} optimizer group(s); the optimizer of this job has "
            f"{len(groups)}"
        )
    for group, settings in zip(groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in settings.items() if k != "params"})


def load_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained module, without starting DeepSpeed's engine
    (``step_dir`` verified by the caller).

    ZeRO 1-3 keep fp32 master weights partitioned in the optimizer states; they are
    consolidated with DeepSpeed's zero_to_fp32. ZeRO-0 keeps the module whole."""
    if not step_dir.is_dir():
        raise CheckpointError(f"no checkpoint directory at {step_dir}")
    if any(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
        state = deepspeed_api.consolidated_fp32(step_dir)
        return {k: v.float() for k, v in state.items()}
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{step_dir} holds no model states")
    blob = deepspeed_api.load(files[0])
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{files[0]} holds no module state")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
