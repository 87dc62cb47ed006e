"""The training loader: this rank's batches from the reader workers, in a fixed order, and
the worker processes' lives.

:class:`TrainLoader` takes batches from the workers in a fixed order (round-robin over the
workers that still have data), whatever order they arrive in, and keeps its position: per worker,
the batches delivered and the raw samples they used. Restored from a checkpoint, each worker
re-reads its raw samples up to that position without decoding them, and the run receives exactly
the batches it would have received without the interruption. Restored from the positions of
another number of ranks or workers (:meth:`TrainLoader.load_elastic`), it reads its share of
the rest of the epoch (:mod:`dist_contrast.data.position`). The workers hold the stop signals
blocked, die with the training process, and are ended by :meth:`TrainLoader.close`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from dist_contrast.config import AugmentConfig, DataConfig
from dist_contrast.data.pipeline import ReaderStream
from dist_contrast.data.position import elastic_plans, layout
from dist_contrast.data.sources import build_sources, check_readers
from dist_contrast.data.tario import FAULT_REASONS
from dist_contrast.errors import DataError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(worker_id: int = 0) -> None:
    """In a loader worker: be killed (SIGKILL) when the training process dies, on Linux.

    A rank killed outright (SIGKILL, the OOM killer) cannot close its loader; its workers,
    which hold the stop signals blocked, would otherwise live on, one of them blocked for ever
    flushing batches into a pipe nobody reads (seen: a test job whose stderr never closed)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: nobody would send it
        os._exit(1)


class TrainLoader:
    """This rank's endless stream of training batches, in a fixed order, with a position that
    :meth:`state_dict` saves and :meth:`load_state_dict` restores (:meth:`load_elastic` from
    the positions of another number of ranks or workers).

    ``dropped`` keeps, per epoch, the keys of the samples of the partial batches the workers
    dropped at its end (a few per worker and epoch), so that checks can count every sample."""

    def __init__(self, stream: ReaderStream, num_workers: int) -> None:
        self.stream, self.num_workers = stream, num_workers
        self.workers = max(1, num_workers)
        self.epoch, self.next_worker = 0, 0
        self._reset_epoch()
        self.closed_faults = dict.fromkeys(FAULT_REASONS, 0)
        self._it: Iterator[dict[str, Any]] | None = None
        self._pending: dict[tuple[int, int, int], dict] = {}  # (epoch, worker, batch) -> batch
        self._ended: dict[tuple[int, int], dict] = {}  # (epoch, worker) -> end marker
        self.plans: dict[int, dict] = {}  # epoch -> this rank's share (elastic resume)
        self.dropped: dict[int, list[str]] = {}
        self._layout: dict | None = None

    def _reset_epoch(self) -> None:
        self.pos = {
            w: {"batch": 0, "raw": 0, "faults": dict.fromkeys(FAULT_REASONS, 0)}
            for w in range(self.workers)
        }
        self.done: set[int] = set()

    def faults(self) -> dict[str, int]:
        """Skipped data so far, by reason, for this rank (all epochs)."""
        out = dict(self.closed_faults)
        for p in self.pos.values():
            for k, v in p["faults"].items():
                out[k] = out.get(k, 0) + v
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_worker": self.next_worker,
            "workers": self.workers,
            "pos": self.pos,
            "done": sorted(self.done),
            "closed_faults": self.closed_faults,
            "rank": self.stream.rank,
            "world": self.stream.world,
            "plans": self.plans,
            "layout": self.layout(),
        }

    def layout(self) -> dict:
        """The settings a saved position depends on (shards, weights, seed, shuffling)."""
        if self._layout is None:
            self._layout = layout(self.stream)
        return self._layout

    def load_state_dict(self, state: dict) -> None:
        if (state["workers"], state["world"]) != (self.workers, self.stream.world):
            raise DataError(
                f"the checkpoint's data position is for {state['world']} rank(s) x "
                f"{state['workers']} worker(s), this run has {self.stream.world} x {self.workers}"
            )
        self.epoch, self.next_worker = state["epoch"], state["next_worker"]
        self.pos = {int(k): v for k, v in state["pos"].items()}
        self.done = set(state["done"])
        self.closed_faults = dict(state["closed_faults"])
        self.plans = {int(k): v for k, v in (state.get("plans") or {}).items()}
        self._it, self._pending, self._ended = None, {}, {}  # workers restart from here

    def load_elastic(self, states: list[dict]) -> dict:
        """Restore this rank's share of the rest of the saved epoch from ``states``, the
        :meth:`state_dict` of every rank of the saved run in rank order, whatever its number
        of ranks and workers: no sample of the epoch is read twice, none is left out.

        Returns the same summary on every rank: ``epoch`` (the oldest epoch a saved rank was
        in), ``left`` (samples of it not consumed yet, over all ranks), ``epochs`` (epoch ->
        samples left, with the later epochs ranks had moved on to), ``was_world``,
        ``was_workers``, ``world``, ``workers``. A :class:`DataError` where the positions
        cannot be placed (other shards or settings, a rank missing)."""
        world, workers = (states[0]["world"], states[0]["workers"]) if states else (0, 0)
        if any((s["world"], s["workers"]) != (world, workers) for s in states):
            raise DataError("the checkpoint's data positions disagree on the number of workers")
        plans, left = elastic_plans(self.stream, states)
        self.epoch, self.next_worker, self.plans = min(left), 0, plans
        self._reset_epoch()
        # the old ranks' skipped-data counts, each on one new rank: the totals are kept
        self.closed_faults = dict.fromkeys(FAULT_REASONS, 0)
        for s in states[self.stream.rank :: self.stream.world]:
            counts = [s["closed_faults"], *(p["faults"] for p in s["pos"].values())]
            for c in counts:
                for k, v in c.items():
                    self.closed_faults[k] = self.closed_faults.get(k, 0) + v
        self._it, self._pending, self._ended = None, {}, {}
        return {
            "epoch": self.epoch,
            "left": left[self.epoch],
            "epochs": left,
            "was_world": world,
            "was_workers": workers,
            "world": self.stream.world,
            "workers": self.workers,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; at its end the epoch's counts are closed and the
        position moves to the start of the next epoch."""
        produced = any(p["batch"] for p in self.pos.values())
        for batch in self._epoch():
            produced = True
            yield batch
        if not produced and self.epoch not in self.plans:  # an elastic rest may run out
            raise DataError(
                f"rank {self.stream.rank} got no full batch of "
                f"{self.stream.batch_size} samples from its shards in an epoch"
            )
        for p in self.pos.values():
            for k, v in p["faults"].items():
                self.closed_faults[k] = self.closed_faults.get(k, 0) + v
        self.epoch += 1
        self.next_worker = 0
        self.plans = {e: p for e, p in self.plans.items() if e >= self.epoch}
        self._reset_epoch()

    def close(self, grace_s: float = 10.0) -> None:
        """End the workers, whatever state the run is in: asked to stop, joined for up to
        ``grace_s`` seconds, then killed. Idempotent; the next iteration starts new ones.

        The workers hold stop signals blocked (``train.preempt.held``), so torch's own
        SIGTERM at shutdown, and the one multiprocessing sends at interpreter exit before it
        joins its daemonic children for ever, do not reach them: a rank that left by an
        exception with the loader still referenced by the traceback used to hang at exit. A
        worker never writes to the run directory, so SIGKILL loses nothing."""
        it, self._it, self._pending, self._ended = self._it, None, {}, {}
        workers = list(getattr(it, "_workers", ()))
        if not workers:
            return
        deadline = time.monotonic() + grace_s
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ runs
        if shutdown is not None:
            shutdown()  # sets the done event and sends each worker its end marker
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
                w.join()

    def start(self) -> None:
        """Start the workers now, from the current position: they fill their prefetch slots
        while the caller does other set-up, and the first batch is ready when it is asked for.
        A no-op once started (iterating starts them too)."""
        self._items()

    def _items(self) -> Iterator[dict[str, Any]]:
        """The workers' tagged items; one DataLoader whose workers live across epochs,
        (re)started from the current position when needed."""
        if self._it is None:
            self.stream.epoch = self.epoch
            self.stream.resume = {w: p for w, p in self.pos.items() if p["raw"]}
            self.stream.plans = self.plans
            d = self.stream.data
            extra = (
                {"prefetch_factor": d.prefetch_factor, "worker_init_fn": die_with_parent}
                if self.num_workers
                else {}
            )
            self._it = iter(
                DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, **extra)
            )
        return self._it

    def _epoch(self) -> Iterator[dict[str, Any]]:
        items = self._items()
        w, e = self.next_worker, self.epoch
        while len(self.done) < self.workers:
            if w in self.done:
                w = (w + 1) % self.workers
                continue
            want = (e, w, self.pos[w]["batch"])
            while want not in self._pending and (e, w) not in self._ended:
                item = next(items)
                if "_error" in item:  # a worker found a source it cannot read at all
                    raise DataError(f"[rank {self.stream.rank}] {item['_error']}")
                key = (item["_epoch"], item["_worker"])
                if "_end" in item:
                    self._ended[key] = item
                else:
                    self._pending[(*key, item["_batch"])] = item
            if want in self._pending:
                item = self._pending.pop(want)
                self.pos[w].update(batch=want[2] + 1, raw=item["_raw"], faults=item["_faults"])
                self.next_worker = w = (w + 1) % self.workers
                yield {k: v for k, v in item.items() if not k.startswith("_")}
            else:
                final = self._ended.pop((e, w))
                self.dropped.setdefault(e, []).extend(final.get("_tail", ()))
                self.pos[w].update(raw=final["_raw"], faults=final["_faults"])
                self.done.add(w)
                w = (w + 1) % self.workers


def train_loader(
    data: DataConfig, augment: AugmentConfig, batch_size: int, seed: int, rank: int, world: int
) -> TrainLoader:
    sources = build_sources(data.train_shards, data.train_weights, "data.train_shards")
    check_readers(sources, world, data.num_workers, data.resampled, "data.train_shards")
    stream = ReaderStream(sources, data, augment, batch_size, seed, rank, world)
    return TrainLoader(stream, data.num_workers)
