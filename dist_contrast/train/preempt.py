"""Preemption: a signal asks the run to stop at the next step boundary, with a checkpoint.

Slurm sends SIGUSR1 ahead of the time limit to a job that asks for it (``#SBATCH
--signal=USR1@120``, or ``scancel --signal=USR1 JOBID``), and SIGTERM at the limit, on
preemption or on ``scancel``; ``kill -USR1``/``kill -TERM`` of the rank processes does the same
under torchrun or without a launcher. The handlers only set a flag: the signal may reach any
rank at any moment, so at the end of every step the flags are all-reduced (a stop on any rank is
a stop on every rank, at the same step), then all ranks write a checkpoint together and leave
with :data:`EXIT_PREEMPTED`. What happens next is the launcher's business: after a USR1 stop
``slurm/train.sbatch`` requeues the job (``scontrol requeue``) and the requeued job continues
from ``latest``; after SIGTERM (scancel, time limit) the job ends with the checkpoint written.

A signal that arrives after the last step changes nothing: the run ends as it would have.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

from dist_contrast import distributed

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early, continue later with checkpoint.resume=latest
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


class Preempted(SystemExit):
    """Leaves the process with :data:`EXIT_PREEMPTED` once the checkpoint of ``step`` is
    written; everything on the way out (``finally`` blocks, the process group) still runs."""

    def __init__(self, step: int, signum: int | None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signum = step, signum


class StopSignals:
    """While active (``with StopSignals() as stop``), SIGUSR1 and SIGTERM set a flag instead
    of ending the process; :meth:`agreed` turns the flags of all ranks into one decision.

    The data loader's workers get the signals blocked (see :func:`held`): a signal sent to
    every process of a job step, as Slurm sends it, stops the run, never a worker."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

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
            # After a stop the checkpoint is written and the process is leaving: a late signal
            # (Slurm ending the step as the first rank exits) must not turn that into a kill.
            signal.signal(sig, signal.SIG_IGN if isinstance(exc, Preempted) else previous)
        self._previous = {}

    def agreed(self) -> bool:
        """Whether some rank received a stop signal: the same answer on every rank. A
        collective: every rank calls it at the same point of every step."""
        return not distributed.all_true(self.signum is None)

    def stop(self, step: int) -> Preempted:
        """The exception that ends the run after the checkpoint of ``step``; says so once."""
        if distributed.is_main():
            what = signal.Signals(self.signum).name if self.signum else "a signal to another rank"
            print(
                f"dist-contrast: {what}: stopped at step {step} with a checkpoint; "
                f"exit code {EXIT_PREEMPTED}, continue with checkpoint.resume=latest",
                file=sys.stderr,
                flush=True,
            )
        return Preempted(step, self.signum)
