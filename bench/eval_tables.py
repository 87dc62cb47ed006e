"""The Markdown tables of ``dist-contrast bench eval`` (:mod:`dist_contrast_bench.eval`), from
the result rows it writes to JSON."""

from __future__ import annotations

from dist_contrast_bench.eval_runs import RECALL_KS


def _md(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def knn_table(knn: dict) -> str:
    headers = ["allocator", "features", "bank_memory_mb", "bank N", "peak RSS MB"]
    headers += ["features MB", "on disk"]
    headers += ["peak - features held MB"]
    headers += ["embed-bank rise MB", "held after embed MB", "kNN rise MB", "kNN chunk"]
    headers += ["embed s", "embed us/sample", "kNN s", "wall s", "top-1"]
    rows = []
    for r in knn["rows"]:
        ph = r["phases"]
        rows.append(
            [
                r["allocator"],
                r["feature_dtype"],
                f"{r['bank_memory_mb']:g}",
                f"{r['N']:,}",
                _f(r["peak_rss_mb"]),
                _f(r["feature_mb"]),
                "yes" if r["bank_on_disk"] else "no",
                _f(r["peak_minus_features_mb"]),
                _f(ph["embed_bank"]["rise_mb"]),
                _f(r["bank_held_mb"]),
                _f(ph["knn"]["rise_mb"]),
                str(r["knn_chunk"]),
                _f(ph["embed_bank"]["seconds"]),
                _f(r["embed_us_per_sample"]),
                _f(ph["knn"]["seconds"]),
                _f(r["wall_seconds"]),
                _f(r["top1"], ".3f"),
            ]
        )
    lines = [_md(headers, rows), ""]
    for a, s in knn["summary"].items():

        def within(ok: bool) -> str:
            return "within" if ok else "NOT within"

        lines.append(
            f"{a}: peak RSS {s['largest_N']:,} / {s['smallest_N']:,}: raw "
            f"x{s['peak_ratio_raw']:.3f} ({within(s['raw_flat_within_10pct'])} 10%), minus the "
            f"bank's features held in memory x{s['peak_ratio_minus_features']:.3f} "
            f"({within(s['minus_features_flat_within_10pct'])} 10%); peak grew "
            f"{s['peak_growth_mb']:.1f} MB, features held {s['feature_growth_mb']:.1f} MB"
        )
    return "\n".join(lines)


def zeroshot_table(zs: dict) -> str:
    headers = ["allocator", "classes x templates", "prompts", "shape", "max norm error"]
    headers += ["seconds", "us/prompt", "peak RSS MB", "rise MB", "ok"]
    rows = [
        [
            r["allocator"],
            f"{zs['classes']} x {zs['templates']}",
            f"{zs['prompts']:,}",
            "x".join(map(str, zs["shape"])),
            f"{zs['max_norm_error']:.1e}",
            _f(r["seconds"]),
            _f(r["seconds"] / zs["prompts"] * 1e6),
            _f(r["peak_rss_mb"]),
            _f(r["rise_mb"]),
            "yes" if r["ok"] else "NO",
        ]
        for r in zs["runs"]
    ]
    return _md(headers, rows)


def retrieval_table(rt: dict) -> str:
    headers = ["allocator", "images x captions", "chunk", "recall s", "peak RSS MB"]
    headers += ["recall rise MB", "full matrix MB", "i2t R@1/5/10", "t2i R@1/5/10"]
    headers += ["reference equal"]

    def r3(d: dict) -> str:
        return "/".join(f"{d[str(k)]:.3f}" for k in RECALL_KS)

    ref = rt["reference"]
    rows = [
        [
            r["allocator"],
            f"{rt['images']:,} x {rt['captions']:,}",
            str(rt["chunk"]),
            _f(r["seconds"], ".2f"),
            _f(r["peak_rss_mb"]),
            _f(r["rise_mb"]),
            _f(rt["full_matrix_mb"]),
            r3(r["recall"]["i2t"]),
            r3(r["recall"]["t2i"]),
            f"{'yes' if r['equal'] else 'NO'} ({ref['images']:,} x {ref['captions']:,})",
        ]
        for r in rt["runs"]
    ]
    return _md(headers, rows)
