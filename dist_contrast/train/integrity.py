"""Which step directory a run may trust: verification against the manifests, the choice of the
step ``checkpoint.resume`` names, and the step that ``eval``/``export`` read.

A step is trusted only once its files match its manifest (:mod:`dist_contrast.train.manifest`).
What happens when they do not depends on who asks:

- ``checkpoint.resume=latest`` (a person at a terminal): refused in one line naming the damaged
  file and the newest intact step, with the setting that takes it;
- ``checkpoint.resume=latest_intact`` (a requeued Slurm job: ``slurm/train.sbatch`` passes it):
  the newest step that verifies; damaged newer ones are set aside (renamed ``step_N.damaged``,
  kept for inspection) and the run says so;
- ``dist-contrast eval``/``export``: refused, naming the newest intact step for ``--step N``.

A run dir is never started over by accident: ``latest`` missing while step directories are there
is refused, not taken as a fresh start.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from dist_contrast import distributed
from dist_contrast.errors import CheckpointError
from dist_contrast.train import checkpoint, manifest, pins
from dist_contrast.train.checkpoint import LATEST, LATEST_INTACT, step_dirs, step_number
from dist_contrast.train.manifest import Damage

EVAL_HOW = "read it with --step {step}"


def has_manifests(root: Path) -> bool:
    return any((p / manifest.MANIFEST).is_file() for p in step_dirs(root))


def structural_damage(step_dir: Path) -> list[Damage]:
    """What ``stat`` shows wrong with ``step_dir`` against its manifest: files missing, added,
    truncated or swapped for something that is not a regular file. A step without a manifest
    is damaged where a sibling has one (this version writes one into every step: it was
    removed); in a run of an earlier version none has one, and none can be checked."""
    try:
        listed = manifest.read(step_dir)
    except CheckpointError as exc:
        return [Damage(manifest.MANIFEST, f"unreadable ({exc})")]
    if listed is None:
        return [Damage(manifest.MANIFEST, "missing")] if has_manifests(step_dir.parent) else []
    return manifest.check_sizes(step_dir, listed)


def verify(step_dir: Path) -> list[Damage]:
    """Everything wrong with ``step_dir``: :func:`structural_damage`, then the SHA-256 of every
    file. Under a process group a collective (each rank hashes its share)."""
    damage = structural_damage(step_dir)
    if damage:
        return damage
    listed = manifest.read(step_dir)
    return [] if listed is None else manifest.verify_folder(step_dir, listed)


def newest_intact(root: Path, before: int | None = None, full: bool = True) -> Path | None:
    """The newest step directory of ``root`` (older than step ``before``, if given) that
    verifies (``full``: hashes too, a collective; else :func:`structural_damage` only)."""
    for step_dir in reversed(step_dirs(root)):
        if before is not None and step_number(step_dir) >= before:
            continue
        if not (verify(step_dir) if full else structural_damage(step_dir)):
            return step_dir
    return None


def damaged_message(step_dir: Path, damage: list[Damage], intact: Path | None, how: str) -> str:
    """'checkpoint DIR is damaged (file: what); the newest intact step is step_Y (...): HOW'."""
    shown = "; ".join(str(d) for d in damage[:3])
    if len(damage) > 3:
        shown += f"; and {len(damage) - 3} more"
    head = f"checkpoint {step_dir} is damaged ({shown})"
    if intact is None:
        return f"{head}; no intact step directory is left in {step_dir.parent}"
    return f"{head}; the newest intact step is {intact.name}: {how}"


def set_aside(step_dir: Path) -> Path:
    """Rename a damaged step directory out of the way (``step_N.damaged``, numbered if taken):
    kept for inspection, never read or pruned again; its universal conversion is removed."""
    target = step_dir.with_name(step_dir.name + checkpoint.DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{checkpoint.DAMAGED_SUFFIX}-{n}")
    os.replace(step_dir, target)
    conversion = checkpoint.universal_dir(step_dir)
    if conversion.is_dir():
        import shutil

        shutil.rmtree(conversion, ignore_errors=True)
    return target


# ---- checkpoint.resume ----------------------------------------------------------------------


def _missing_latest(root: Path, steps: list[Path]) -> CheckpointError:
    return CheckpointError(
        f"{root / LATEST} is missing but {len(steps)} step director"
        f"{'y is' if len(steps) == 1 else 'ies are'} there (newest {steps[-1].name}): the run "
        f"is not started over; continue from the newest intact step with "
        f"checkpoint.resume={LATEST_INTACT}, or from one of them with checkpoint.resume=PATH"
    )


def resolve_resume(root: Path, spec: str, full: bool = False) -> Path | None:
    """The step directory ``checkpoint.resume`` names: '' -> None (a fresh run), 'latest' ->
    the one ``latest`` names, 'latest_intact' -> the newest step that verifies, a path -> that
    step directory; None also where a run has no step yet. Checked against its manifest with
    ``stat`` only, or (``full``: ``train --check``) with the hashes too; the run itself hashes
    them when it starts (:func:`choose`)."""
    check = verify if full else structural_damage
    if spec == "":
        return None
    if spec == LATEST_INTACT:
        steps = step_dirs(root)
        intact = newest_intact(root, full=full)
        if steps and intact is None:
            raise CheckpointError(f"no intact step directory in {root} (all damaged)")
        return intact
    if spec == LATEST:
        latest = checkpoint.read_latest(root)
        if latest is None:
            steps = step_dirs(root)
            if steps:
                raise _missing_latest(root, steps)
            return None
        _refuse_damaged(latest, check(latest), full=full)
        return latest
    path = Path(spec)
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise CheckpointError(f"checkpoint.resume: '{spec}' is not a checkpoint step directory")
    _refuse_damaged(path, check(path), full=full, by_path=True)
    return path


def _refuse_damaged(
    step_dir: Path, damage: list[Damage], full: bool, by_path: bool = False
) -> None:
    """Refuse ``step_dir`` with ``damage`` in one line naming the newest intact step beside it
    and the setting that takes it."""
    if not damage:
        return
    intact = None
    if checkpoint.STEP_DIR.match(step_dir.name):
        intact = newest_intact(step_dir.parent, before=step_number(step_dir), full=full)
    how = f"continue from it with checkpoint.resume={intact if by_path else LATEST_INTACT}"
    raise CheckpointError(damaged_message(step_dir, damage, intact, how))


def choose(root: Path, spec: str) -> Path | None:
    """:func:`resolve_resume`, with every file hashed against the manifest (a collective: all
    ranks call it and agree). ``latest`` or a path that fails is refused naming the damaged
    file and the newest intact step; ``latest_intact`` takes the newest step that verifies,
    sets the damaged newer ones aside and says so."""
    step_dir = resolve_resume(root, spec)
    if step_dir is None:
        return None
    if spec != LATEST_INTACT:
        _refuse_damaged(step_dir, verify(step_dir), full=True, by_path=spec != LATEST)
        return step_dir
    bad: list[tuple[Path, list[Damage]]] = []
    for candidate in reversed(step_dirs(root)):
        damage = verify(candidate)
        if not damage:
            _set_aside_all(bad, candidate)
            return candidate
        bad.append((candidate, damage))
    raise CheckpointError(f"no intact step directory in {root} (all damaged)")


def _set_aside_all(bad: list[tuple[Path, list[Damage]]], intact: Path) -> None:
    """Rank 0 renames the damaged steps newer than ``intact`` out of the way, saying so."""
    if bad and distributed.is_main():
        for path, damage in bad:
            moved = set_aside(path)
            line = damaged_message(path, damage, intact, "continuing from it")
            print(f"dist-contrast: {line}; set aside as {moved.name}", file=sys.stderr, flush=True)
    distributed.barrier()


# ---- eval and export ------------------------------------------------------------------------


@contextlib.contextmanager
def reading(root: Path, step: int | None = None) -> Iterator[Path]:
    """The step directory that ``eval``/``export`` read: ``latest`` (or step ``step``),
    verified, and pinned for as long as the block runs, so that the run's pruning cannot
    remove it half-read. A damaged one is refused, naming the newest intact step."""
    for _ in range(5):  # a save may move `latest` and prune between the choice and the pin
        step_dir = _reading_choice(root, step)
        with pins.pinned(step_dir):
            if not step_dir.is_dir():
                continue
            damage = verify(step_dir)
            if damage:
                intact = newest_intact(root, before=step_number(step_dir))
                how = EVAL_HOW.format(step=step_number(intact)) if intact else ""
                raise CheckpointError(damaged_message(step_dir, damage, intact, how))
            yield step_dir
            return
    raise CheckpointError(f"the checkpoints of {root} were pruned while being read: try again")


def _reading_choice(root: Path, step: int | None) -> Path:
    steps = step_dirs(root)
    if step is not None:
        path = root / checkpoint.step_tag(step)
        if path not in steps:
            have = ", ".join(str(step_number(p)) for p in steps) or "none"
            raise CheckpointError(f"{root} has no step {step} (steps: {have})")
        return path
    latest = checkpoint.read_latest(root)
    if latest is not None:
        return latest
    if steps:
        raise CheckpointError(
            f"{root / LATEST} is missing but step directories are there (newest "
            f"{steps[-1].name}): choose one with --step N"
        )
    raise CheckpointError(f"run dir '{root.parent}' has no checkpoint yet")
