"""PNG plots of a run from its ``metrics.jsonl``: loss and samples/s against step, and the
evaluation figures logged during training (``eval.every``) in ``eval.png``.

matplotlib is an optional dependency (the ``test``/``bench`` extras): without it the plots are
skipped with a one-line notice, the run itself is unaffected."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PLOTS = {"loss": "loss", "samples_per_sec": "samples / s"}


def write_plots(metrics: Path, out_dir: Path) -> list[Path]:
    """One PNG per metric of :data:`PLOTS` in ``out_dir``; the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dist-contrast: notice: matplotlib is not installed, no plots", file=sys.stderr)
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in PLOTS.items():
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    evals = _eval_series(rows)
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in evals.items():
            ax.plot(*zip(*points, strict=True), marker=".", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 / recall@1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "eval.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _eval_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``eval/<name>`` figures (top-1 and R@1) against step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/") and k.endswith(("top1", "_r1")) and v is not None:
                series.setdefault(k[5:], []).append((r["step"], v))
    return series
