"""Resuming a run on another number of ranks or loader workers.

A checkpoint holds one ``rank_XXXXX.pt`` per rank of the job that wrote it: the rank's data
position, its rank-local method state (queue shards, memory bank rows) and its random
generators. Resumed by the same number of ranks and workers, each rank takes its own file back
and the run continues bit-exactly (:meth:`Trainer.resume`). Otherwise every new rank reads
every old rank's file and takes its share:

- data: the samples of the current epoch that no old reader consumed, dealt to the new
  readers (:meth:`dist_contrast.data.loader.TrainLoader.load_elastic`);
- rank-local state: queue rows dealt to the new shards in their order by age, memory bank rows
  routed to their new owners (``Method.load_extra_state_elastic``);
- random generators: a rank that existed takes its own back, a new rank's are derived from
  (seed, step, rank).

Model, optimizer and schedule come from DeepSpeed's files, consolidated where the ZeRO
partitioning changed (:func:`dist_contrast.train.checkpoint.load`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from dist_contrast.config import Config
from dist_contrast.data.loader import TrainLoader
from dist_contrast.distributed import mix_seed
from dist_contrast.errors import CheckpointError
from dist_contrast.methods import Method
from dist_contrast.negatives.queue import nearest_queue_size
from dist_contrast.train import checkpoint


def same_layout(state: dict, world: int, workers: int) -> bool:
    """Whether a rank's saved state comes from a job of ``world`` ranks x ``workers`` loader
    workers: then it is restored as it is, bit-exactly."""
    return state["world"] == world and state["data"]["workers"] == workers


def resume_elastic(
    loader: TrainLoader, method: Method, states: list[dict], seed: int, step: int, rank: int
) -> str:
    """This rank's share of every saved rank's ``states`` (data position, rank-local method
    state, random generators); the resume line."""
    data = loader.load_elastic([s["data"] for s in states])
    phrases = method.load_extra_state_elastic([s["method"] for s in states])
    if rank < len(states) and "rng" in states[rank]:
        checkpoint.set_rng_state(states[rank]["rng"])  # a rank that existed: its own
    else:
        derive_rng(seed, step, rank)
    return resume_line(step, data["world"], data["workers"], data, phrases)


def fit_queue_size(cfg: Config, step_dir: Path | None, world: int) -> str | None:
    """A run resumed on a number of ranks that does not divide ``method.queue_size`` (each
    rank holds K_total / W keys) continues with the nearest size that it divides: set in
    ``cfg``, said in the returned line. A fresh run is refused such a size instead (by the
    queue itself, naming the nearest size)."""
    m = cfg.method
    queued = m.name == "moco_v2" or (m.name == "clip" and m.queues)
    if step_dir is None or not queued or m.queue_size % world == 0:
        return None
    size = nearest_queue_size(m.queue_size, world)
    line = (
        f"method.queue_size {m.queue_size:,} is not a multiple of {world} ranks: the resumed "
        f"run keeps {size:,} keys ({size // world:,} a rank)"
    )
    m.queue_size = size
    return line


def saved_states(step_dir: Path) -> list[dict] | None:
    """Every rank's ``rank_XXXXX.pt`` of ``step_dir`` in rank order; None where the
    checkpoint has none (a run from before per-rank files)."""
    first = checkpoint.load_rank_state(step_dir, 0)
    if first is None:
        return None
    world = int(first["world"])
    states = [first]
    for r in range(1, world):
        state = checkpoint.load_rank_state(step_dir, r)
        if state is None:
            raise CheckpointError(
                f"{step_dir} lacks rank {r}'s state ({checkpoint.rank_file(step_dir, r).name}) "
                f"of the {world} ranks that wrote it"
            )
        states.append(state)
    return states


def derive_rng(seed: int, step: int, rank: int) -> None:
    """Random generators of a rank that did not exist in the job that wrote the checkpoint:
    Python, NumPy and torch (CPU and CUDA) seeded from (seed, step, rank)."""
    s = mix_seed(seed, step, rank, 5)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def resume_line(step: int, world: int, workers: int, data: dict, phrases: list[str]) -> str:
    """ "resumed step 1200 on 4 ranks x 2 workers (was 8 x 1): 37,120 samples of epoch 3 left;
    queue 65,536 keys re-sharded"."""
    was = f"was {data['was_world']} x {data['was_workers']}"
    parts = [f"{data['left']:,} samples of epoch {data['epoch']} left", *phrases]
    return f"resumed step {step} on {world} rank(s) x {workers} worker(s) ({was}): " + "; ".join(
        parts
    )
