"""Helpers shared by the benchmarks of ``dist_contrast_bench``: machine facts, device sync,
profiler memory, and where results go."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from dist_contrast.train.plan import profiled_peak_bytes  # noqa: F401  (the benches' import)

RESULTS_DIR = Path("bench", "results")


def default_out(filename: str) -> str:
    """The default ``--out`` of a benchmark: ``bench/results/FILENAME`` under the current folder.

    From a checkout's root that is its results folder; anywhere else (an installed wheel) the
    folder is created there by ``write_json``: the source tree is never needed.
    """
    return str(RESULTS_DIR / filename)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model


def usable_cores() -> int:
    """Cores this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to do on CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def write_json(path: str | Path, result: dict) -> Path:
    """Write a result file (indented, trailing newline), creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
