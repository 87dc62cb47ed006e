"""Where metrics go: ``metrics.jsonl`` always, wandb (offline by default), a progress bar."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_contrast.config import Config, to_dict
from dist_contrast.errors import CheckpointError
from dist_contrast.train import preempt

TOP_KEYS = ("knn_top1", "linear_top1", "zeroshot_top1", "i2t_r1", "t2i_r1")


class MetricsLogger:
    """Active on the main rank only; a no-op elsewhere."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        _drop_rows_after(run_dir / "metrics.jsonl", start_step)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.logging.wandb:
            try:
                self.wandb = _start_wandb(run_dir, cfg)
            except Exception as exc:  # noqa: BLE001 (wandb's own errors vary by version)
                self._lose_wandb(exc)
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=cfg.train.steps,
                initial=start_step,
                desc=cfg.run.name,
                unit="step",
                dynamic_ncols=True,
            )

    def _write(self, record: dict[str, Any]) -> None:
        """One row into metrics.jsonl and, while it lasts, wandb."""
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(
                    {k: v for k, v in record.items() if k != "step"}, step=record["step"]
                )
            except Exception as exc:  # noqa: BLE001 (any failure of the service)
                self._lose_wandb(exc)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(record)
        if self.bar is not None:
            loss = record["loss"]  # None when every step since the last line was skipped
            self.bar.set_postfix(
                loss="skipped" if loss is None else f"{loss:.4f}",
                sps=f"{record['samples_per_sec']:.0f}",
            )

    def log_eval(self, record: dict[str, Any]) -> None:
        """A row of evaluation figures (``step`` and ``eval/...`` keys): metrics.jsonl, wandb
        and one line under the progress bar."""
        if not self.enabled:
            return
        self._write(record)
        shown = ", ".join(
            f"{k[5:]} {100 * v:.1f}%" for k, v in record.items() if k.endswith(TOP_KEYS)
        )
        message = f"step {record['step']}: {shown}"
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:  # noqa: BLE001
                self._lose_wandb(exc)
        self.file = self.wandb = self.bar = None

    def _lose_wandb(self, exc: Exception) -> None:
        """wandb is a mirror of metrics.jsonl: when its service fails (killed by a signal meant
        for the ranks, a lost connection), the run goes on without it, said once."""
        print(
            f"dist-contrast: warning: wandb stopped ({type(exc).__name__}: {exc}); the run goes "
            "on, metrics.jsonl keeps every row",
            file=sys.stderr,
            flush=True,
        )
        self.wandb = None


class SampleKeyLog:
    """``logging.sample_keys``: each rank appends ``{"step", "keys"}`` for every step to
    ``<run>/sample_keys/rank_NNNNN.jsonl``; a step's keys are its batch's on that rank, taken
    or skipped (a skipped step consumes its samples too). On a resume from step S, the rows
    after S are dropped first, this rank's own and, by rank 0, those of ranks the new world no
    longer has, so that every step appears once in all files together."""

    def __init__(self, run_dir: Path, start_step: int, rank: int, world: int) -> None:
        folder = run_dir / "sample_keys"
        if folder.is_symlink() or folder.exists() and not folder.is_dir():
            raise CheckpointError(f"'{folder}' is not a folder of this run (a link or a file)")
        folder.mkdir(exist_ok=True)
        path = folder / f"rank_{rank:05d}.jsonl"
        if path.is_symlink() or path.exists() and not path.is_file():
            # appending would write through a link or block on a FIFO
            raise CheckpointError(f"'{path}' is not a regular file: remove it to log sample keys")
        mine = [path]
        if rank == 0:  # the files of ranks past this world (a run resumed on fewer ranks)
            mine += [
                p
                for p in sorted(folder.glob("rank_*.jsonl"))
                if p.is_file() and not p.is_symlink() and _rank_of(p) >= world
            ]
        for p in mine:
            _drop_rows_after(p, start_step)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, step: int, keys) -> None:
        self.file.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")

    def close(self) -> None:
        self.file.close()


def _rank_of(path: Path) -> int:
    try:
        return int(path.stem.removeprefix("rank_"))
    except ValueError:
        return -1


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step`` (the checkpoint a run resumes from): the rows a
    stopped or killed run logged after its last checkpoint are logged again by the resumed
    run, and each step must appear once. Rewritten through a temporary file; a torn last line
    (a kill mid-write) is dropped too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola 2020: mean ``||f(x) - f(y)||^alpha`` over positive pairs (rows of ``x`` and
    ``y``), on L2-normalised embeddings. 0 is perfect alignment, 4 the worst (alpha = 2)."""
    x, y = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola 2020: ``log mean exp(-t ||f(a) - f(b)||^2)`` over all pairs a != b of rows,
    on L2-normalised embeddings; lower is more uniform."""
    x = F.normalize(x.double(), dim=1)
    sq = torch.pdist(x).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


def embedding_metrics(embeddings: list[torch.Tensor]) -> dict[str, float]:
    """``alignment`` of the first two embeddings (row i of one is the positive of row i of the
    other) and ``uniformity``, the mean of each one's (as Wang & Isola train with); {} unless
    they are two [N, D] with N > 1."""
    if len(embeddings) < 2:
        return {}
    x, y = embeddings[0].detach(), embeddings[1].detach()
    if x.ndim != 2 or x.shape != y.shape or len(x) < 2:
        return {}
    return {
        "alignment": float(alignment(x, y)),
        "uniformity": float((uniformity(x) + uniformity(y)) / 2),
    }


def _start_wandb(run_dir: Path, cfg: Config):
    """The wandb run of ``run_dir`` (in ``run_dir/wandb``), in ``logging.wandb_mode`` unless
    ``WANDB_MODE`` says otherwise. Its id is kept in ``run_dir/wandb/run_id``: a resumed or
    requeued run continues the same wandb run (online: resumed in place; offline: each start
    writes an ``offline-run-*-ID`` folder, and ``wandb sync`` appends them to one run)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    wb_dir = run_dir / "wandb"
    wb_dir.mkdir(exist_ok=True)
    id_file = wb_dir / "run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    # Started with the stop signals held, the wandb service process (wandb-core) inherits them
    # blocked, like the loader workers: a SIGTERM or SIGUSR1 sent to every process of a Slurm
    # job must not end it before rank 0 has logged the stop and written the checkpoint.
    with preempt.held():
        return _init_wandb(wandb, run_dir, cfg, run_id)


def _init_wandb(wandb, run_dir: Path, cfg: Config, run_id: str):
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.run.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=os.environ.get("WANDB_MODE") or cfg.logging.wandb_mode,
        config=to_dict(cfg),
    )
