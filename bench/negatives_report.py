"""The summary, acceptance check, table and memory plot of ``dist_contrast_bench.negatives``."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

MIB = 2**20
GIB = 2**30
THRESHOLDS = {"memory_ratio_max": 0.1, "time_ratio_max": 1.5, "large_extra_gib_max": 1.5}


def would_need_bytes(b_global: int, world: int) -> int:
    """Full-matrix memory per rank, analytically: logits, softmax and gradient in fp32."""
    return 4 * (b_global // world) * b_global * 3


def _summarise(plan: dict, per_rank: list[list[dict]], world: int) -> list[dict]:
    """One row per (case, mode): the slowest rank's step time, the largest rank's peak."""
    rows = []
    for i, case in enumerate(plan["cases"]):
        for mode in case["modes"]:
            steps = list(zip(*(r[i]["times"][mode] for r in per_rank), strict=True))
            slowest = [max(s) * 1e3 for s in steps]
            peaks = [r[i]["peaks"][mode] for r in per_rank]
            peak = None if None in peaks else max(peaks)
            rows.append(
                {
                    "role": case["role"],
                    "B": case["B"],
                    "B_local": case["B"] // world,
                    "path": mode,
                    "ms": statistics.median(slowest),
                    "ms_min": min(slowest),
                    "timed_steps": len(slowest),
                    "time_profiled": per_rank[0][i]["timed_profiled"],
                    "peak_mib": None if peak is None else peak / MIB,
                    "would_need_mib": would_need_bytes(case["B"], world) / MIB,
                }
            )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _acceptance(rows: list[dict], args: argparse.Namespace) -> dict:
    full = next(r for r in rows if r["role"] == "compare" and r["path"] == "full")
    tiled = next(r for r in rows if r["role"] == "compare" and r["path"] == "tiled")
    large = next(r for r in rows if r["role"] == "large")
    memory_ratio = _ratio(tiled["peak_mib"], full["peak_mib"])
    time_ratio = _ratio(tiled["ms"], full["ms"])
    extra_gib = None if large["peak_mib"] is None else large["peak_mib"] * MIB / GIB
    return {
        "compare_B": args.compare,
        "memory_ratio": memory_ratio,
        "time_ratio": time_ratio,
        "time_ratio_min": _ratio(tiled["ms_min"], full["ms_min"]),
        "large_B": args.large,
        "large_extra_gib": extra_gib,
        "large_would_need_gib": large["would_need_mib"] * MIB / GIB,
        **THRESHOLDS,
        "memory_ok": memory_ratio is not None and memory_ratio <= THRESHOLDS["memory_ratio_max"],
        "time_ok": time_ratio is not None and time_ratio <= THRESHOLDS["time_ratio_max"],
        "large_ok": extra_gib is not None and extra_gib <= THRESHOLDS["large_extra_gib_max"],
    }


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _table(rows: list[dict], acc: dict, header: str) -> str:
    lines = [
        header,
        f"{'row':<8} {'B':>6} {'B/W':>6} {'path':<6} {'median ms':>10} {'min ms':>9} "
        f"{'peak MiB':>9} {'full would need MiB':>20}",
    ]
    order = {"compare": 0, "large": 1, "series": 2}
    for r in sorted(rows, key=lambda r: (order[r["role"]], r["B"], r["path"])):
        ms = _fmt(r["ms"], ".0f") + ("*" if r["time_profiled"] else "")
        lines.append(
            f"{r['role']:<8} {r['B']:>6} {r['B_local']:>6} {r['path']:<6} {ms:>10} "
            f"{_fmt(r['ms_min'], '.0f'):>9} {_fmt(r['peak_mib'], '.1f'):>9} "
            f"{r['would_need_mib']:>20.0f}"
        )
    lines.append("* one profiled step (time includes the profiler's overhead)")
    ok = {True: "ok", False: "NOT MET"}
    lines.append(
        f"B={acc['compare_B']}: tiled/full peak memory {_fmt(acc['memory_ratio'], '.3f')} "
        f"(<= {acc['memory_ratio_max']}: {ok[acc['memory_ok']]}), "
        f"time {_fmt(acc['time_ratio'], '.2f')}x median, {_fmt(acc['time_ratio_min'], '.2f')}x "
        f"min (<= {acc['time_ratio_max']}: {ok[acc['time_ok']]})"
    )
    lines.append(
        f"B={acc['large_B']}: tiled extra {_fmt(acc['large_extra_gib'], '.2f')} GiB per rank "
        f"(<= {acc['large_extra_gib_max']}: {ok[acc['large_ok']]}); the full matrix would need "
        f"{acc['large_would_need_gib']:.1f} GiB"
    )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path_name, style in (("full", "o-"), ("tiled", "s-")):
        pts = sorted(
            (r["B"], r["peak_mib"])
            for r in rows
            if r["path"] == path_name and r["peak_mib"] is not None
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{path_name} (measured)")
    sizes = sorted({r["B"] for r in rows})
    need = [next(r["would_need_mib"] for r in rows if r["B"] == b) for b in sizes]
    ax.plot(sizes, need, "k--", label="full, would need (4 B x B/W x B x 3)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size B")
    ax.set_ylabel("peak extra memory per rank (MiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
