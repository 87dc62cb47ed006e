"""Timers of ``dist_contrast_bench.train``: wall time by phase within each training step, taken
from outside the code it times (wrapped calls), and each rank's peak memory.

A step runs from one call of its start (:meth:`Phases.begin_step`) to the next (or
:meth:`Phases.end`). A timed call made inside another timed call counts to the outer one only
(a forward run by a timed save or log call counts to that call), so the phases of a step never
overlap and their sum is at most the step's wall time; the rest is ``other``. ``envelope`` timers
(:meth:`Phases.envelope`) stand beside the phases: they measure a call that contains phases
(the engine's ``train_step``) without taking their time from them.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_contrast_bench.common import sync

CPU = "cpu:"  # row keys of CPU seconds (this process, all its threads): "cpu:<phase>", "cpu:wall"


class Phases:
    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.rows: list[dict[str, float]] = []  # per step: phase -> seconds, "wall"
        self.on_step: list[Callable[[], None]] = []  # called at each step start (profiler)
        self._row: dict[str, float] | None = None
        self._start = self._cpu = 0.0
        self._inside = False

    def begin_step(self) -> None:
        """Close the step running (if any) and start the next one."""
        self.end()
        self._row, self._start, self._cpu = {}, time.perf_counter(), time.process_time()
        for fn in self.on_step:
            fn()

    def end(self) -> None:
        """Close the step running (if any)."""
        sync(self.dev)
        if self._row is not None:
            self._row["start"] = self._start  # perf_counter seconds: orders the loops' steps
            self._row["wall"] = time.perf_counter() - self._start
            self._row[CPU + "wall"] = time.process_time() - self._cpu
            self.rows.append(self._row)
        self._row = None

    def _add(self, name: str, wall: float, cpu: float) -> None:
        if self._row is not None:
            self._row[name] = self._row.get(name, 0.0) + wall
            self._row[CPU + name] = self._row.get(CPU + name, 0.0) + cpu

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its wall time added to phase ``name`` of the running step
        (not when called inside another timed call, nor outside a step)."""
        if self._inside or self._row is None:
            return fn(*args, **kwargs)
        self._inside = True
        sync(self.dev)
        try:
            return self._measured(name, fn, *args, **kwargs)
        finally:
            self._inside = False

    def _measured(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; its wall and CPU time (to the device's end) added to
        ``name``."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            sync(self.dev)
            self._add(name, time.perf_counter() - t0, time.process_time() - c0)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as phase ``name`` at every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.timed(name, fn, *args, **kwargs)

        return timed

    def envelope(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` whose wall time is recorded as ``name`` beside the phases it contains."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            return self._measured(name, fn, *args, **kwargs)

        return timed


def summarise(
    rows: list[dict[str, float]],
    warmup: int,
    phases: tuple[str, ...],
    amortised: dict[str, int] | None = None,
    envelopes: tuple[str, ...] = (),
    key: str = "",
) -> dict[str, Any]:
    """Mean milliseconds per steady step (the steps after ``warmup``) of each phase and
    envelope, ``other`` (the step outside the phases) and ``step`` (the whole), of wall time
    (``key`` "") or CPU time (``key`` :data:`CPU`). ``amortised`` {phase: every}: a phase that
    runs once every so many steps (a save, a log line) counts as the mean of the calls made (in
    any step) divided by ``every``, in place of the calls the steady steps happened to make."""
    steady = rows[warmup:]
    if not steady:
        raise ValueError(f"no steady steps: {len(rows)} steps, {warmup} of them warm-up")
    amortised = {p: every for p, every in (amortised or {}).items() if p in phases}

    def mean_ms(values: list[float]) -> float:
        return 1e3 * statistics.fmean(values)

    names = [p for p in phases if p not in amortised] + list(envelopes)
    out: dict[str, Any] = {p: mean_ms([r.get(key + p, 0.0) for r in steady]) for p in names}
    for p, every in amortised.items():
        calls = [r[key + p] for r in rows if key + p in r]
        out[p + "_call_ms"] = mean_ms(calls) if calls else None
        out[p] = out[p + "_call_ms"] / every if calls and every > 0 else 0.0
    walls = [r[key + "wall"] - sum(r.get(key + p, 0.0) for p in amortised) for r in steady]
    out["step"] = mean_ms(walls) + sum(out[p] for p in amortised)
    out["other"] = out["step"] - sum(out[p] for p in phases)
    out["steps"] = len(steady)
    return out


# --------------------------------------------------------------------------------------------
# Memory

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(dev: torch.device) -> bool:
    """Start a new peak: the process' peak RSS (Linux: ``clear_refs`` 5) and CUDA's peak
    allocation. False where the RSS peak cannot be reset (it is then the process' lifetime
    peak)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory(dev: torch.device, reset_ok: bool) -> dict[str, float | bool | None]:
    """Peak RSS (MiB) since :func:`reset_peak` (or the process' lifetime peak where it could
    not reset), the RSS now, and on CUDA ``torch.cuda.max_memory_allocated`` (MiB)."""
    hwm = _status_kib("VmHWM")
    if hwm is None:  # no /proc: the lifetime peak (KiB on Linux)
        hwm, reset_ok = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    rss = _status_kib("VmRSS")
    out: dict[str, float | bool | None] = {
        "peak_rss_mib": hwm / 1024,
        "rss_now_mib": None if rss is None else rss / 1024,
        "peak_since_start": reset_ok,
    }
    if dev.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out
