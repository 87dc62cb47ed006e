"""Preemption: a signal asks the run to stop at the next step boundary, with a checkpoint.

Slurm sends SIGUSR1 ahead of the time limit to a job that asks for it (``#SBATCH
--signal=USR1@120``, or ``scancel --signal=USR1 JOBID``), and SIGTERM at the limit, on
preemption or on ``scancel``; ``kill -USR1``/``kill -TERM`` of the rank processes, of torchrun
or of ``launch/local.sh`` does the same. The handlers only set a flag: the signal may reach any
rank at any moment, so at the end of every step the flags are all-reduced (a stop on any rank is
a stop on every rank, at the same step), then all ranks write a checkpoint together and leave.

A stop that comes while the rank waits for data (a stalled shard, a network that does not
answer) cannot wait for the end of the step for ever: the wait lasts at most
``train.stop_grace_s`` more (data that comes within it ends in the agreed stop above). A rank
that gives up leaves without a checkpoint (``checkpoint.resume=latest`` goes back to the last
one; the line says which steps are lost, if any); a peer blocked in a collective of that step
leaves when the collective fails, as a preemption too if the signal reached it as well and the
peer left its stop line (a peer that did not receive it says that another rank ended; a peer
killed outright leaves no line, and the signal is then the launcher ending the job: a failure).

How the process ends (:func:`leave`): the line ``dist-contrast: preempted at step N; ...``,
printed last, and :data:`EXIT_PREEMPTED`; under torchrun (torchelastic), whose report turns any
non-zero exit of a rank into a failure, the ranks of an agreed stop exit 0 instead, and
``launch/local.sh`` learns of the preemption from ``$DIST_CONTRAST_PREEMPT_FILE``, where the
line is also written, and exits 75 (``slurm/train.sbatch`` reads it too: after a USR1 stop it
requeues the job, which continues from ``latest``). A rank that gave up alone exits 75 under
every launcher, so that torchrun or srun ends its peers.

A signal that arrives after the last step changes nothing: the run ends as it would have.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

from dist_contrast import distributed

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early, continue later with checkpoint.resume=latest
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STATUS_ENV = "DIST_CONTRAST_PREEMPT_FILE"  # where a launcher wants the line (launch/local.sh)
RESUME = "checkpoint.resume=latest"
POLL_S = 0.2  # how often a wait looks at the stop flag


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGUSR1 and SIGTERM in this thread for the duration; a signal that arrives meanwhile
    is delivered when it ends. Processes forked inside (the data loader's workers, which are
    started lazily when the first batch is asked for) inherit the signals blocked: Slurm signals
    every process of a job step, and a worker must not die of a stop signal (torch's workers
    die of SIGTERM) before the ranks have written their checkpoint."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def under_torchelastic() -> bool:
    """Whether torchrun (torchelastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class Preempted(SystemExit):
    """Leaves the process once the stop is settled: after the agreed checkpoint of ``step``
    (``agreed``), or alone, back to the checkpoint of ``saved`` (None: none yet) with the
    steps since lost. Everything on the way out (``finally`` blocks, the process group) still
    runs; :func:`leave` prints the line and gives the exit code."""

    def __init__(
        self, step: int, signum: int | None, *, agreed: bool, saved: int | None, why: str = ""
    ) -> None:
        super().__init__(0 if agreed and under_torchelastic() else EXIT_PREEMPTED)
        self.step, self.signum, self.agreed, self.saved, self.why = step, signum, agreed, saved, why

    def line(self) -> str:
        """``dist-contrast: preempted at step N; ...``: what was kept and what to do next."""
        what = signal.Signals(self.signum).name if self.signum else "a stop signal to another rank"
        head = f"dist-contrast: preempted at step {self.step}; continue with {RESUME}"
        if self.agreed:
            return f"{head} ({what}; every rank wrote the checkpoint of step {self.step})"
        why = f"{what}, {self.why}" if self.why else what
        back = self.saved or 0
        if back == self.step:
            since = " since the last checkpoint" if self.saved else ""
            return f"{head} ({why}; no step was taken{since}: nothing is lost)"
        to = f"the checkpoint of step {back}" if self.saved else "step 0 (no checkpoint yet)"
        first = back + 1
        lost = f"steps {first}-{self.step} are" if first < self.step else f"step {first} is"
        return f"{head}, which goes back to {to}: {lost} lost ({why})"


def leave(exc: Preempted) -> int:
    """Say how the run stopped, last, and return the exit code: the line is printed by rank 0
    after an agreed stop (every rank knows the same), by each rank that stopped alone
    otherwise, and appended to ``$DIST_CONTRAST_PREEMPT_FILE`` if the launcher set it."""
    if exc.agreed and int(os.environ.get("RANK", "0")) != 0:
        return int(exc.code)
    line = exc.line()
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get(STATUS_ENV)
    if path:
        try:
            with open(path, "a") as f:  # one short write: whole lines, whichever rank is first
                f.write(line + "\n")
        except OSError:
            pass
    return int(exc.code)


def peer_stopped(wait_s: float = 3.0) -> bool:
    """Whether a peer that left first left for a stop, not because it was killed: under a
    launcher that collects the stop lines (``$DIST_CONTRAST_PREEMPT_FILE``: launch/local.sh,
    slurm/train.sbatch), a rank that stops alone writes its line there before it exits, so the
    file says so (waited for ``wait_s``, as its exit may reach this rank first); a rank killed
    outright (SIGKILL, the OOM killer) writes nothing, and the stop signal this rank got is
    then the launcher ending the job's other ranks (srun --kill-on-bad-exit, torchrun), not a
    preemption: a failure, which must not requeue. Without the file it cannot be told apart:
    a stop, as before."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.stat(path).st_size > 0:  # a stat: never opens (nor blocks on) the path
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class StopSignals:
    """While active (``with StopSignals(grace_s) as stop``), SIGUSR1 and SIGTERM set a flag
    instead of ending the process; :meth:`agreed` turns the flags of all ranks into one
    decision, :meth:`expired` says when a wait has lasted past the grace.

    The data loader's workers get the signals blocked (see :func:`held`): a signal sent to
    every process of a job step, as Slurm sends it, stops the run, never a worker."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.since = 0.0  # time.monotonic() of the first stop signal
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.since = signum, time.monotonic()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
                signal.siginterrupt(sig, False)  # blocking calls resume after the handler
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            # After a stop the process is leaving: a late signal (Slurm ending the step as the
            # first rank exits, torchrun passing a signal on) must not turn that into a kill.
            signal.signal(sig, signal.SIG_IGN if isinstance(exc, Preempted) else previous)
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether this rank received a stop signal."""
        return self.signum is not None

    def expired(self) -> bool:
        """Whether this rank received a stop signal more than ``grace_s`` seconds ago."""
        return self.requested and time.monotonic() - self.since >= self.grace_s

    def agreed(self) -> bool:
        """Whether some rank received a stop signal: the same answer on every rank. A
        collective: every rank calls it at the same point of every step."""
        return not distributed.all_true(self.signum is None)

    def stop(self, step: int) -> Preempted:
        """The exception that ends the run after the checkpoint of ``step``, on every rank."""
        return Preempted(step, self.signum, agreed=True, saved=step)

    def alone(self, step: int, saved: int | None, why: str) -> Preempted:
        """The exception that ends this rank without a checkpoint: back to ``saved``."""
        return Preempted(step, self.signum, agreed=False, saved=saved, why=why)


class Fetcher:
    """``next(items)`` in a thread of its own, for a caller that must act on a stop signal
    while it waits: the thread holds the stop signals blocked (what it forks, a loader's
    workers started lazily, inherits the block, as with :func:`held`), the caller does not,
    and waits in steps of :data:`POLL_S` that a handler can run between.

    :meth:`next` returns the item, re-raises what ``next`` raised, or raises what ``give_up``
    returns (an exception, or None to wait on); a wait given up leaves the thread where it is
    (a daemon): its items are not asked for again."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self._asked: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._got: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._busy = False  # an item asked for and not received (a wait given up)
        with held():  # the thread starts with the signals blocked
            self._thread = threading.Thread(target=self._serve, name="batches", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        with held():
            while self._asked.get():
                try:
                    self._got.put((True, next(self._items)))
                except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                    self._got.put((False, exc))

    def next(self, give_up: Callable[[], BaseException | None] | None = None) -> Any:
        self._asked.put(True)
        self._busy = True
        while True:
            try:
                ok, value = self._got.get(timeout=POLL_S)
            except queue.Empty:
                exc = give_up() if give_up is not None else None
                if exc is not None:
                    raise exc from None
                continue
            self._busy = False
            if ok:
                return value
            raise value

    def close(self) -> None:
        """Let the thread end once it is back; if it is not in a wait, wait for it to end, so
        that no thread of the loader's is still running when the process exits."""
        self._asked.put(False)
        if not self._busy:
            self._thread.join(timeout=5.0)
