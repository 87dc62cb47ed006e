"""Evaluation at scale on one process: streaming kNN, zero-shot class embeddings, retrieval.

    dist-contrast bench eval [--sizes 20000,50000,200000] [--queries 10000] [--data-dir DIR]
                             [--feature-dtypes fp32,fp16] [--bank-memory-mb 1024,0]
                             [--zs-classes 1000] [--zs-templates 80] [--retrieval-images 5000]
                             [--allocators glibc,mmap128k] [--quick]

Each measured run is a fresh process (:mod:`dist_contrast_bench.eval_runs`), so its peak
resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) is its own. Memory is reported in MB
(10^6 bytes). Where Linux allows it (``/proc/self/clear_refs``), the peak is also reset before
each phase of a run so that each phase's own peak is known; the process peak is the largest.
Each measurement runs once per ``--allocators`` setting: ``glibc`` (its defaults, what a run
gets) and ``mmap128k`` (``MALLOC_MMAP_THRESHOLD_=131072``: blocks of 128 KiB and more are
mapped and given back at free). Under glibc's defaults a freed large block raises the mmap
threshold, later large blocks come from the heap and freed ones stay resident, so RSS there
includes memory no tensor holds any more; the second setting shows what the work itself needs.

1. Streaming kNN. Synthetic WebDataset shards (``tarfile`` + PIL): ``--image-size`` px
   grayscale PNGs, each a noisy copy of one of ``--classes`` random class patterns, label in
   ``cls``; written once into ``--data-dir`` (default: a folder of the system's temp dir,
   reused by later runs) as ``bank/`` and ``query/`` shard folders. The bank of N samples is
   the first N of the largest bank (its first shards). Both sets go through
   ``dist_contrast.eval.stream.embed_set`` (``open_eval_set`` units, decode, centre crop,
   normalise, batches of ``eval.batch_size``) with a seeded random conv encoder to ``--dim``
   features stored as each of ``--feature-dtypes``, the bank kept in memory up to each of
   ``--bank-memory-mb`` (``eval.bank_memory_mb``; past it, on disk and read back a block at a
   time), then ``knn_top1_sharded`` (one process, k and temperature of ``EvalConfig``) of the
   queries against the bank, a block of bank rows (8 MB) and a chunk of at most ``--knn-chunk``
   queries (similarities at most 8 MB) at a time. Per size: peak RSS, the bank's feature bytes
   (N x D x itemsize), whether they were on disk, peak minus features, wall times.
2. Zero-shot: ``class_embeddings`` of ``--zs-classes`` names ("class 0", ...) x
   ``--zs-templates`` prompt templates (CLIP's 80 ImageNet templates) through a random
   ``TextTransformer`` over ``ByteTokenizer(32)``; time, peak RSS, shape and norms.
3. Retrieval: random unit features, ``--retrieval-images`` images with ``--captions-per-image``
   captions each (a caption is its image's feature plus noise, renormalised; key = image
   index), ``recall_at`` image->text and text->image in query chunks of ``--retrieval-chunk``.
   Peak RSS of that run beside the full similarity matrix it never builds; R@1/5/10 checked
   equal to a naive full-matrix reference (full similarity and relevance matrices, rows sorted)
   on the first ``--reference-images`` images and their captions.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from dist_contrast.eval.stream import FEATURE_DTYPES
from dist_contrast_bench.common import cpu_model, default_out, usable_cores, write_json
from dist_contrast_bench.eval_runs import (
    ALLOCATORS,
    CLIP_TEMPLATES,
    PARTS,
    QUICK,
    ensure_data,
    run_child,
)
from dist_contrast_bench.eval_tables import knn_table, retrieval_table, zeroshot_table

# --------------------------------------------------------------------------------------------
# The runs and their summaries (tables: eval_tables.py)


def _knn_row(args: argparse.Namespace, data: dict, n: int, setting: tuple) -> dict:
    allocator, dtype, bank_mb = setting
    spec = {
        "n": n,
        "queries": args.queries,
        "bank": data["bank"],
        "query": data["query"],
        "shard_size": args.shard_size,
        "image_size": args.image_size,
        "dim": args.dim,
        "seed": args.seed,
        "threads": args.threads,
        "knn_chunk": args.knn_chunk,
        "feature_dtype": dtype,
        "bank_memory_mb": bank_mb,
    }
    row = run_child("knn", spec, args.timeout, allocator)
    ph = row["phases"]
    row["embed_us_per_sample"] = ph["embed_bank"]["seconds"] / n * 1e6
    row["us_per_sample"] = row["child_seconds"] / n * 1e6
    derive_knn_row(row)
    before, after = ph["embed_bank"]["start_rss_mb"], ph["knn"]["start_rss_mb"]
    # resident growth the bank's embedding left behind (its features and what else stays)
    row["bank_held_mb"] = None if before is None or after is None else after - before
    print(
        f"  kNN N={n} ({_setting_name(setting)}): peak {row['peak_rss_mb']:.0f} MB, "
        f"{row['wall_seconds']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def derive_knn_row(row: dict) -> None:
    """Figures of a kNN run derived from its measurements: the bank's features held in memory
    (none when they went to disk) and the peak without them."""
    row["features_held_mb"] = 0.0 if row["bank_on_disk"] else row["feature_mb"]
    row["peak_minus_features_mb"] = row["peak_rss_mb"] - row["features_held_mb"]


def _setting_name(setting: tuple) -> str:
    allocator, dtype, bank_mb = setting
    return f"{allocator}, {dtype} features, eval.bank_memory_mb={bank_mb:g}"


def _flatness(rows: list[dict]) -> dict:
    small, large = rows[0], rows[-1]
    raw = large["peak_rss_mb"] / small["peak_rss_mb"]
    net = large["peak_minus_features_mb"] / small["peak_minus_features_mb"]
    return {
        "smallest_N": small["N"],
        "largest_N": large["N"],
        "peak_ratio_raw": raw,
        "peak_ratio_minus_features": net,
        "raw_flat_within_10pct": raw <= 1.10,
        "minus_features_flat_within_10pct": net <= 1.10,
        "peak_growth_mb": large["peak_rss_mb"] - small["peak_rss_mb"],
        "feature_growth_mb": large["features_held_mb"] - small["features_held_mb"],
    }


def _knn(args: argparse.Namespace, data: dict) -> dict:
    settings = [
        (a, d, m) for a in args.allocators for d in args.feature_dtypes for m in args.bank_memory
    ]
    runs = {s: [_knn_row(args, data, n, s) for n in args.sizes] for s in settings}
    rows = [r for s in settings for r in runs[s]]
    summary = {_setting_name(s): _flatness(runs[s]) for s in settings}
    return {"rows": rows, "summary": summary}


def _compact(run: dict, phase: str) -> dict:
    ph = run["phases"][phase]
    return {
        "allocator": run["allocator"],
        "peak_rss_mb": run["peak_rss_mb"],
        "baseline_rss_mb": run["baseline_rss_mb"],
        "rise_mb": ph["rise_mb"],
        "seconds": ph["seconds"],
        "wall_seconds": run["wall_seconds"],
    }


def _zeroshot(args: argparse.Namespace) -> dict:
    spec = {
        "zs_classes": args.zs_classes,
        "zs_templates": args.zs_templates,
        "text_width": args.text_width,
        "batch_size": args.zs_batch_size,
        "seed": args.seed,
        "threads": args.threads,
    }
    runs = [run_child("zeroshot", spec, args.timeout, a) for a in args.allocators]
    want = [args.zs_classes, args.text_width]
    for r in runs:
        r["ok"] = r["shape"] == want and r["unit_norms"] and r["finite"]
    result = dict(runs[0])  # the figures of the first allocator; each run's memory in "runs"
    result["ok"] = all(r["ok"] for r in runs)
    result["runs"] = [dict(_compact(r, "class_embeddings"), ok=r["ok"]) for r in runs]
    return result


def _retrieval(args: argparse.Namespace) -> dict:
    spec = {
        "images": args.retrieval_images,
        "per_image": args.captions_per_image,
        "dim": args.dim,
        "chunk": args.retrieval_chunk,
        "reference_images": args.reference_images,
        "noise": args.retrieval_noise,
        "seed": args.seed,
        "threads": args.threads,
    }
    runs = [run_child("retrieval", spec, args.timeout, a) for a in args.allocators]
    result = dict(runs[0])
    result["reference"] = dict(
        runs[0]["reference"], equal=all(r["reference"]["equal"] for r in runs)
    )
    result["runs"] = [
        dict(_compact(r, "recall_chunked"), recall=r["recall"], equal=r["reference"]["equal"])
        for r in runs
    ]
    for r in result["runs"]:
        r["rise_over_full_matrix"] = (
            None if r["rise_mb"] is None else r["rise_mb"] / result["full_matrix_mb"]
        )
    return result


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench eval", description=__doc__.strip().splitlines()[0]
    )
    p.add_argument("--parts", default=",".join(PARTS), help="which of knn,zeroshot,retrieval")
    p.add_argument("--sizes", default="20000,50000,200000", help="kNN bank sizes N")
    p.add_argument("--queries", type=int, default=10000, help="kNN query samples")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per synthetic shard")
    p.add_argument("--classes", type=int, default=100, help="classes of the synthetic images")
    p.add_argument("--image-size", type=int, default=8, help="synthetic images, px a side")
    p.add_argument("--noise", type=float, default=96, help="pixel noise std of the images")
    p.add_argument("--dim", type=int, default=64, help="feature dimension (kNN, retrieval)")
    p.add_argument(
        "--knn-chunk", type=int, default=1024, help="kNN query chunk (fewer where a block is big)"
    )
    p.add_argument(
        "--feature-dtypes",
        default="fp32,fp16",
        help="eval.feature_dtype of the kNN runs: each of fp32,fp16,bf16 given",
    )
    p.add_argument(
        "--bank-memory-mb",
        default="1024,0",
        help="eval.bank_memory_mb of the kNN runs, each given (1024, the default: the bank in "
        "memory here; 0: on disk, read back a block at a time)",
    )
    p.add_argument("--zs-classes", type=int, default=1000)
    p.add_argument("--zs-templates", type=int, default=80, help=f"<= {len(CLIP_TEMPLATES)}")
    p.add_argument("--zs-batch-size", type=int, default=512, help="prompts per text batch")
    p.add_argument("--text-width", type=int, default=64, help="width of the text transformer")
    p.add_argument("--retrieval-images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--retrieval-chunk", type=int, default=1024, help="recall_at query chunk")
    p.add_argument("--retrieval-noise", type=float, default=0.2, help="caption noise std")
    p.add_argument("--reference-images", type=int, default=1000, help="naive-check subset")
    p.add_argument(
        "--allocators",
        default=",".join(ALLOCATORS),
        help=f"run each measurement under these malloc settings: {','.join(ALLOCATORS)}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch threads")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measured run")
    p.add_argument(
        "--data-dir",
        default=str(Path(tempfile.gettempdir()) / "dist_contrast_bench_eval"),
        help="cache of the synthetic shards (reused between runs)",
    )
    p.add_argument("--out", default=default_out("eval.json"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="banks 2,000/5,000, 500 queries, 50 classes x 8 templates, retrieval 200 x 1,000",
    )
    raw = list(argv)
    args = p.parse_args(raw)
    if args.quick:
        given = {a.split("=", 1)[0] for a in raw}
        for key, value in QUICK.items():  # explicit options win over --quick
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    args.allocators = list(dict.fromkeys(s.strip() for s in args.allocators.split(",") if s))
    if not args.allocators or set(args.allocators) - set(ALLOCATORS):
        p.error(f"--allocators: choose from {','.join(ALLOCATORS)}")
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts: choose from {','.join(PARTS)}")
    dtypes = (s.strip() for s in args.feature_dtypes.split(",") if s.strip())
    args.feature_dtypes = list(dict.fromkeys(dtypes))
    if not args.feature_dtypes or set(args.feature_dtypes) - set(FEATURE_DTYPES):
        p.error(f"--feature-dtypes: choose from {','.join(FEATURE_DTYPES)}")
    try:
        args.bank_memory = list(dict.fromkeys(float(s) for s in args.bank_memory_mb.split(",")))
    except ValueError:
        p.error(f"--bank-memory-mb must be comma-separated numbers, got {args.bank_memory_mb!r}")
    if not args.bank_memory or min(args.bank_memory) < 0:
        p.error("--bank-memory-mb: numbers >= 0")
    counts = (args.queries, args.shard_size, args.classes, args.image_size, args.dim)
    counts += (args.zs_classes, args.zs_templates, args.zs_batch_size, args.text_width)
    counts += (args.retrieval_images, args.captions_per_image, args.retrieval_chunk)
    counts += (args.reference_images, args.threads, args.knn_chunk)
    if not args.sizes or min(args.sizes) < 1 or min(counts) < 1:
        p.error("sizes, counts, dimensions and chunks must be >= 1")
    if args.zs_templates > len(CLIP_TEMPLATES):
        p.error(f"--zs-templates: at most {len(CLIP_TEMPLATES)}")
    if args.text_width % 4:
        p.error("--text-width must be a multiple of 4 (4 heads)")
    args.reference_images = min(args.reference_images, args.retrieval_images)
    args.command = " ".join(["dist-contrast bench eval", *raw])
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    start = time.perf_counter()
    machine = {
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    result: dict = {
        "benchmark": "eval",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": args.command,
        "machine": machine,
        "torch": torch.__version__,
        "threads": args.threads,
        "memory": "peak RSS of a fresh process (getrusage ru_maxrss), MB = 10^6 bytes; "
        "phase rise = a phase's own peak minus the RSS at its start (peak reset through "
        "/proc/self/clear_refs)",
    }
    header = (
        f"dist-contrast bench eval, {machine['cpu']}, {args.threads} torch thread(s), "
        f"torch {torch.__version__}, {result['date']}\n`{args.command}`"
    )
    print(header, flush=True)
    out = []
    if "knn" in args.parts:
        result["data"] = data = ensure_data(args)
        print(
            f"data: {data['root']} ({data['shards_written']} shard(s) written in "
            f"{data['write_seconds']:.1f} s)",
            file=sys.stderr,
        )
        result["knn"] = _knn(args, data)
        title = (
            f"## Streaming kNN: {args.queries:,} queries vs bank N, {args.image_size}x"
            f"{args.image_size} PNG shards, D={args.dim}, one process"
        )
        out.append(title + "\n\n" + knn_table(result["knn"]))
    if "zeroshot" in args.parts:
        result["zeroshot"] = _zeroshot(args)
        title = (
            f"## Zero-shot class embeddings: TextTransformer(width {args.text_width}, 2 layers) "
            "over ByteTokenizer(32)"
        )
        out.append(title + "\n\n" + zeroshot_table(result["zeroshot"]))
    if "retrieval" in args.parts:
        result["retrieval"] = _retrieval(args)
        out.append(
            f"## Retrieval: recall_at both ways, D={args.dim}\n\n"
            + retrieval_table(result["retrieval"])
        )
    result["seconds"] = time.perf_counter() - start
    print("\n\n".join(out))
    print(f"\n{result['seconds']:.1f} s in all")
    print(f"wrote {write_json(args.out, result)}")
    ok = result.get("zeroshot", {}).get("ok", True)
    ok = ok and result.get("retrieval", {}).get("reference", {}).get("equal", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
