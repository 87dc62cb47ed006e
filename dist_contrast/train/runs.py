"""A run directory: checks before a run starts, and what a finished (or running) run holds."""

from __future__ import annotations

import copy
import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from dist_contrast.config import Config, load_config, save_config
from dist_contrast.config.parse import split_override, split_top_level
from dist_contrast.data.decode import sample_fields
from dist_contrast.data.shards import REMOTE_PREFIXES, dataset_size
from dist_contrast.data.sources import Source, first_sample
from dist_contrast.errors import CheckpointError, ConfigError, DataError
from dist_contrast.methods import registry
from dist_contrast.train import checkpoint, integrity

LOCK = ".lock"  # in the run directory: held (flock) by rank 0 of the run that owns it
CONFIG_YAML = "config.yaml"
TOKENIZER_JSON = "tokenizer.json"  # the run's copy of a BPE tokenizer file


def check_run_dir(cfg: Config, probe_lock: bool = True) -> None:
    """Refuse a run dir that cannot be used, before any process group starts: a file in its
    place, a folder this user cannot write, another run using it, checkpoints of an earlier
    run that is not being resumed. ``probe_lock``: only where no rank 0 of this same job may
    hold the lock already (``--check``, and rank 0 itself)."""
    run_dir = cfg.run_dir
    for path in (Path(cfg.run.dir), run_dir):
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"run dir '{path}' exists and is a file")
    _check_writable(run_dir)
    if probe_lock and (run_dir / LOCK).exists():
        lock_run_dir(run_dir).close()  # refused if another run holds it
    if not cfg.run.overwrite:
        _refuse_start_over(run_dir, cfg.checkpoint.resume)


METRICS = "metrics.jsonl"
# What run.overwrite=true deletes from a run dir before a fresh start (wandb/run_id: the next
# start opens a new wandb run; the earlier offline runs stay in wandb/)
OVERWRITTEN = ("checkpoints", METRICS, "eval.json", "plots", "export", "wandb/run_id")


def _refuse_start_over(run_dir: Path, resume: str) -> None:
    """A run dir holding an earlier run's work is resumed, or refused: a fresh start (or a
    resume from a step other than its newest) would overwrite its checkpoints, prune them or
    cut its metrics. ``run.overwrite=true`` is the user saying otherwise."""
    root = run_dir / "checkpoints"
    steps = checkpoint.step_dirs(root)
    fix = "start another with run.name=NEW_NAME, or start over with run.overwrite=true"
    if resume == "":
        if steps:
            raise CheckpointError(
                f"run dir '{run_dir}' already holds checkpoints ({steps[-1].name} the newest): "
                f"continue it with checkpoint.resume=latest, or {fix}"
            )
        if _has_rows(run_dir / METRICS):
            raise CheckpointError(
                f"run dir '{run_dir}' holds the metrics of an earlier run (no checkpoint): {fix}"
            )
        return
    if resume in (checkpoint.LATEST, checkpoint.LATEST_INTACT) or not steps:
        return
    path = Path(resume)
    if path.resolve() != steps[-1].resolve():
        what = (
            "an older step of this run"
            if path.resolve().parent == root.resolve()
            else ("a step of another run")
        )
        raise CheckpointError(
            f"checkpoint.resume='{resume}' is {what}, and run dir '{run_dir}' holds checkpoints "
            f"up to {steps[-1].name}: continuing would overwrite them and cut its metrics; "
            f"continue from it in a new run dir (run.name=NEW_NAME), or allow it with "
            "run.overwrite=true"
        )


def _has_rows(path: Path) -> bool:
    if not path.is_file():  # a FIFO in its place is not read (it would block)
        return False
    try:
        with open(path, "rb") as f:
            return bool(f.read(4096).strip())
    except OSError:
        return False


def clear_for_overwrite(cfg: Config, resume_from: Path | None) -> list[str]:
    """``run.overwrite=true``, on rank 0 before anything is written: a fresh start (or a resume
    from another run's checkpoint) deletes the earlier run's :data:`OVERWRITTEN`; a resume from
    an older step of this run deletes the step directories after it (the metrics after it are
    cut by the resume, as always).
    Returns what was deleted, for the line the run says."""
    run_dir, gone = cfg.run_dir, []
    if not cfg.run.overwrite:
        return gone
    root = run_dir / "checkpoints"
    if resume_from is not None and resume_from.resolve().parent == root.resolve():
        for step_dir in checkpoint.step_dirs(root):
            if checkpoint.step_number(step_dir) > _step_of(resume_from):
                shutil.rmtree(step_dir)
                shutil.rmtree(checkpoint.universal_dir(step_dir), ignore_errors=True)
                gone.append(f"checkpoints/{step_dir.name}")
        return gone
    for name in OVERWRITTEN:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        gone.append(name)
    return gone


def _step_of(step_dir: Path) -> int:
    m = checkpoint.STEP_DIR.match(step_dir.name)
    return int(m.group(1)) if m else -1


def _check_writable(run_dir: Path) -> None:
    """The run dir, or the folder it would be made in, takes a file (written and removed)."""
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dist-contrast-probe-"):
            pass
    except OSError as exc:
        what = "run dir" if folder == run_dir else f"folder of run dir '{run_dir}',"
        raise CheckpointError(f"{what} '{folder}' cannot be written: {exc.strerror}") from None


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Rank 0's lock on ``run_dir`` (created if needed): an open file under an exclusive
    ``flock``, held until it is closed or the process ends, however it ends (the kernel drops
    it: a killed run leaves no stale lock). A second run on the folder is refused in one line
    naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")  # noqa: SIM115 (held for the run's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(
            f"run dir '{run_dir}' is in use by another run ({holder}); wait for it, or start "
            "this one with run.name=NEW_NAME"
        ) from None
    handle.seek(0)
    handle.truncate()
    host, job = socket.gethostname(), os.environ.get("SLURM_JOB_ID")
    handle.write(f"pid {os.getpid()} on {host}" + (f", Slurm job {job}" if job else "") + "\n")
    handle.flush()
    return handle


def _absolute(spec: str) -> str:
    """A shard pattern / path with its local items made absolute (remote URLs as they are)."""
    if not spec:
        return spec
    items = split_top_level(spec)
    return ",".join(
        i if i.startswith(REMOTE_PREFIXES) or os.path.isabs(i) else os.path.abspath(i)
        for i in items
    )


def save_run_config(cfg: Config, run_dir: Path) -> None:
    """``config.yaml`` of a run, movable: local data paths (shards, ``model.init_from``) made
    absolute, and a BPE tokenizer file copied into the run dir (:func:`load_run` reads that
    copy). The run can then be moved or copied and still be evaluated and exported from
    anywhere, as long as its data stays where it was."""
    saved = copy.deepcopy(cfg)
    d = saved.data
    if isinstance(d.train_shards, list):
        d.train_shards = [_absolute(s) for s in d.train_shards]
    else:
        d.train_shards = _absolute(d.train_shards)
    d.val_shards = _absolute(d.val_shards)
    if d.tokenizer == "bpe" and d.tokenizer_path:
        d.tokenizer_path = os.path.abspath(d.tokenizer_path)
        if Path(d.tokenizer_path).is_file():
            tmp = run_dir / f".{TOKENIZER_JSON}.tmp"
            shutil.copyfile(d.tokenizer_path, tmp)
            os.replace(tmp, run_dir / TOKENIZER_JSON)
    kind, sep, where = saved.model.init_from.partition(":")
    if sep and where:
        saved.model.init_from = f"{kind}:{os.path.abspath(where)}"
    save_config(saved, run_dir / CONFIG_YAML)


def load_run(run_dir: Path, eval_overrides: Sequence[str] = ()) -> tuple[Config, Path]:
    """The resolved config of a run and its latest checkpoint directory, verified against its
    manifest (``trained_method(*load_run(run))``). ``eval`` and ``export`` read the checkpoint
    through :func:`dist_contrast.train.integrity.reading` instead, which also pins it."""
    cfg = run_config(run_dir, eval_overrides)
    with integrity.reading(run_dir / "checkpoints") as step_dir:
        return cfg, step_dir


def run_config(run_dir: Path, eval_overrides: Sequence[str] = ()) -> Config:
    """The resolved config of a run; ``eval_overrides`` (``eval.key=value``) change how it is
    evaluated, nothing else."""
    for item in eval_overrides:
        if not split_override(item)[0].startswith("eval."):
            raise ConfigError(
                f"override {item!r}: only eval.* settings change for an evaluation (the rest "
                "is the run's config.yaml)"
            )
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist or is not a directory")
    if not (run_dir / CONFIG_YAML).is_file():
        raise CheckpointError(f"'{run_dir}' has no config.yaml: is it a run directory?")
    cfg = resolve(load_config(run_dir / CONFIG_YAML, eval_overrides))  # also an older version's
    if cfg.data.tokenizer == "bpe" and (run_dir / TOKENIZER_JSON).is_file():
        cfg.data.tokenizer_path = str(run_dir / TOKENIZER_JSON)  # the run's own copy
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill in what the config leaves to the data: InstDisc's ``method.bank_size`` (0: the
    samples of every split in the ``counts.json`` beside the training shards). The method is then
    built from the config alone, and the saved ``config.yaml`` says the size it used."""
    if registry.spec(cfg.method.name).module == "instdisc" and cfg.method.bank_size == 0:
        try:
            cfg.method.bank_size = dataset_size(cfg.data.train_shards, "data.train_shards")
        except DataError as exc:
            raise ConfigError(
                f"method 'instdisc' needs the data set size ({exc}); set method.bank_size to "
                "the number of sample indices"
            ) from None
    return cfg


def check_method_data(cfg: Config, sources: list[Source]) -> None:
    """The method registry's checks: the loss fits the method, and the first sample of the
    training shards carries the fields the method needs (local shards only)."""
    registry.check(cfg)
    first = first_sample([u for src in sources for u in src.urls])
    if first is not None:
        sample, url = first
        registry.check_samples(cfg, sample_fields(sample), f"'{url}'")
