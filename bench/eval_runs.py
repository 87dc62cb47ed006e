"""The measured runs of ``dist-contrast bench eval`` (:mod:`dist_contrast_bench.eval`), each in
a fresh interpreter (``python -m dist_contrast_bench.eval_runs SPEC.json``) so that its peak
resident set is its own: the synthetic shards they read, the peak-memory probes, and the kNN,
zero-shot and retrieval children. What each measures is described in the benchmark's module
docstring."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

MB = 1e6
PARTS = ("knn", "zeroshot", "retrieval")
# The C allocator of each measured process: glibc's defaults (a freed large block raises its
# mmap threshold, so later large blocks come from the heap, which keeps freed memory resident)
# and a fixed 128 KiB mmap threshold (large blocks mapped and unmapped at free: RSS follows
# the live memory more closely). Other allocators ignore these variables.
ALLOCATORS = {"glibc": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
RECALL_KS = (1, 5, 10)

# CLIP's 80 ImageNet prompt templates (Radford et al. 2021, the notebook of openai/CLIP).
CLIP_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

QUICK = {
    "sizes": "2000,5000",
    "queries": 500,
    "shard_size": 1000,
    "zs_classes": 50,
    "zs_templates": 8,
    "retrieval_images": 200,
    "reference_images": 200,
    "retrieval_chunk": 64,
    "allocators": "glibc",
    "feature_dtypes": "fp32,fp16",
    "bank_memory_mb": "1024,0",
}


# --------------------------------------------------------------------------------------------
# Memory of this process


def _status_mb(field: str) -> float | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    """Peak RSS so far (since the last reset): ``ru_maxrss`` is KiB on Linux, bytes on macOS."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Peaks:
    """Per-phase peak RSS of this process and the process peak over all of them."""

    def __init__(self) -> None:
        self.process_mb = _maxrss_mb()
        self.baseline_mb = _status_mb("VmRSS")  # resident after imports and setup
        self.phases: dict[str, dict] = {}
        self.resettable = True

    @contextlib.contextmanager
    def phase(self, name: str):
        self.process_mb = max(self.process_mb, _maxrss_mb())
        self.resettable = self.resettable and _reset_peak()
        start_mb = _status_mb("VmRSS")
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        peak = _maxrss_mb()
        self.process_mb = max(self.process_mb, peak)
        self.phases[name] = {
            "seconds": seconds,
            "start_rss_mb": start_mb,
            # without a reset the peak is the process's so far, not the phase's own
            "peak_rss_mb": peak,
            "rise_mb": None if start_mb is None or not self.resettable else peak - start_mb,
        }

    def summary(self) -> dict:
        self.process_mb = max(self.process_mb, _maxrss_mb())
        return {
            "peak_rss_mb": self.process_mb,
            "baseline_rss_mb": self.baseline_mb,
            "phase_peaks_are_own": self.resettable,
            "phases": self.phases,
        }


# --------------------------------------------------------------------------------------------
# Synthetic shards


def _signature(args: argparse.Namespace) -> str:
    a = args
    return f"px{a.image_size}_c{a.classes}_n{a.shard_size}_noise{a.noise:g}_seed{a.seed}"


def _png(pixels) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, set_id: int, index: int, args: argparse.Namespace) -> None:
    """Shard ``index`` of a set: a deterministic function of the seed, set and index."""
    import numpy as np

    px = args.image_size
    protos = np.random.default_rng(args.seed).integers(0, 256, (args.classes, px, px))
    rng = np.random.default_rng([args.seed, set_id, index])
    labels = rng.integers(0, args.classes, args.shard_size)
    noise = rng.normal(0.0, args.noise, (args.shard_size, px, px))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
    tmp = path.with_name(path.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(args.shard_size):
            key = f"{index:04d}_{i:06d}"
            _add(tar, f"{key}.png", _png(images[i]))
            _add(tar, f"{key}.cls", str(int(labels[i])).encode())
    os.replace(tmp, path)  # a shard is there whole or not at all


def ensure_data(args: argparse.Namespace) -> dict:
    """The bank and query shard folders, writing the shards they lack."""
    root = Path(args.data_dir) / _signature(args)
    need = {
        "bank": math.ceil(max(args.sizes) / args.shard_size),
        "query": math.ceil(args.queries / args.shard_size),
    }
    start, written = time.perf_counter(), 0
    for set_id, (name, count) in enumerate(need.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        names = folder / "classnames.txt"
        if not names.is_file():
            names.write_text("".join(f"class {c}\n" for c in range(args.classes)))
        for index in range(count):
            path = folder / f"{name}-{index:06d}.tar"
            if not path.is_file():
                _write_shard(path, set_id, index, args)
                written += 1
    return {
        "root": str(root),
        "bank": str(root / "bank"),
        "query": str(root / "query"),
        "shards_written": written,
        "write_seconds": time.perf_counter() - start,
        "shards_needed": need,
    }


# --------------------------------------------------------------------------------------------
# The measured runs (each in a fresh process)


def _embed(spec: dict, folder: str, n: int, encoder, data_cfg, batch_size: int, memory_mb=None):
    from dist_contrast.data.evalsets import open_eval_set
    from dist_contrast.eval.stream import embed_set, towers_fn

    units = open_eval_set(folder).units[: math.ceil(n / spec["shard_size"])]
    emb = embed_set(
        units,
        towers_fn({"encoder": encoder}),
        data_cfg,
        batch_size=batch_size,
        max_samples=n,
        feature_dtype=spec["feature_dtype"],
        memory_mb=memory_mb,
    )
    if len(emb) != n:
        raise RuntimeError(f"{folder}: embedded {len(emb)} samples, expected {n}")
    return emb.feats.pop("encoder"), emb.labels  # as evaluation keeps them: raw, stored dtype


def child_knn(spec: dict) -> dict:
    from torch import nn

    from dist_contrast.config import DataConfig, EvalConfig
    from dist_contrast.eval.probes import BANK_BLOCK_BYTES, bounded_chunk, knn_top1_sharded

    torch.manual_seed(spec["seed"])
    px, dim = spec["image_size"], spec["dim"]
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * px * px, dim)
    ).eval()
    data_cfg = DataConfig(image_size=px, channels=1, mean=[0.5], std=[0.5])
    ev = EvalConfig()
    n, chunk = spec["n"], spec["knn_chunk"]
    peaks = Peaks()
    with peaks.phase("embed_queries"):
        q, q_labels = _embed(spec, spec["query"], spec["queries"], encoder, data_cfg, ev.batch_size)
    with peaks.phase("embed_bank"):
        bank, bank_labels = _embed(
            spec, spec["bank"], n, encoder, data_cfg, ev.batch_size, spec["bank_memory_mb"]
        )
    with peaks.phase("knn"):
        top1 = knn_top1_sharded(bank, bank_labels, q, q_labels, ev.knn_k, ev.knn_temperature, chunk)
    block_rows = min(n, max(1, BANK_BLOCK_BYTES // (4 * dim)))
    itemsize = torch.empty((), dtype=bank.dtype).element_size()
    return {
        "N": n,
        "queries": spec["queries"],
        "dim": dim,
        "feature_dtype": spec["feature_dtype"],
        "bank_memory_mb": spec["bank_memory_mb"],
        "bank_on_disk": not isinstance(bank, torch.Tensor),
        "k": ev.knn_k,
        "knn_chunk": bounded_chunk(chunk, block_rows),
        "knn_block_rows": block_rows,
        "knn_block_mb": 4 * bounded_chunk(chunk, block_rows) * block_rows / MB,
        "top1": top1,
        "feature_mb": n * dim * itemsize / MB,
        "query_feature_mb": spec["queries"] * dim * itemsize / MB,
        **peaks.summary(),
    }


def child_zeroshot(spec: dict) -> dict:
    from dist_contrast.data.tokenizer import ByteTokenizer
    from dist_contrast.eval.image_text import class_embeddings
    from dist_contrast.models.text import TextTransformer

    torch.manual_seed(spec["seed"])
    tok = ByteTokenizer(32)
    tower = TextTransformer(
        tok.vocab_size, 32, tok.eot_id, width=spec["text_width"], layers=2, heads=4
    ).eval()
    classes = [f"class {c}" for c in range(spec["zs_classes"])]
    templates = list(CLIP_TEMPLATES[: spec["zs_templates"]])
    peaks = Peaks()
    with peaks.phase("class_embeddings"):
        emb = class_embeddings(tower, tok, classes, templates, spec["batch_size"])
    norms = emb.norm(dim=1)
    prompts = len(classes) * len(templates)
    return {
        "classes": len(classes),
        "templates": len(templates),
        "distinct_templates": len(set(templates)),
        "prompts": prompts,
        "text_width": spec["text_width"],
        "batch_size": spec["batch_size"],
        "shape": list(emb.shape),
        "max_norm_error": float((norms - 1).abs().max()),
        "unit_norms": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5)),
        "finite": bool(torch.isfinite(emb).all()),
        "seconds": peaks.phases["class_embeddings"]["seconds"],
        "us_per_prompt": peaks.phases["class_embeddings"]["seconds"] / prompts * 1e6,
        "all_prompt_features_mb": prompts * spec["text_width"] * 4 / MB,
        **peaks.summary(),
    }


def reference_recall(query, items, query_keys, item_keys, ks=RECALL_KS) -> dict[int, float]:
    """Naive recall@k: the full similarity and relevance matrices, every row sorted."""
    sim = query @ items.T
    relevant = query_keys[:, None] == item_keys[None, :]
    order = sim.argsort(dim=1, descending=True)
    ranked = relevant.gather(1, order)  # [n, items]: relevance in rank order
    return {k: int(ranked[:, :k].any(dim=1).sum()) / len(query) for k in ks}


def child_retrieval(spec: dict) -> dict:
    import torch.nn.functional as F

    from dist_contrast.eval.image_text import recall_at

    g = torch.Generator().manual_seed(spec["seed"])
    n, per, dim, chunk = spec["images"], spec["per_image"], spec["dim"], spec["chunk"]
    image_keys = torch.arange(n)
    caption_keys = torch.arange(n * per) // per
    peaks = Peaks()
    with peaks.phase("features"):
        img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
        noise = spec["noise"] * torch.randn(n * per, dim, generator=g)
        txt = F.normalize(img[caption_keys] + noise, dim=1)
        del noise
    with peaks.phase("recall_chunked"):
        i2t = recall_at(img, txt, image_keys, caption_keys, RECALL_KS, chunk)
        t2i = recall_at(txt, img, caption_keys, image_keys, RECALL_KS, chunk)
    chunked = peaks.summary()  # before the reference, whose full matrices are not measured
    m = spec["reference_images"]
    sub = (img[:m], txt[: m * per], image_keys[:m], caption_keys[: m * per])
    got = {
        "i2t": recall_at(sub[0], sub[1], sub[2], sub[3], RECALL_KS, chunk),
        "t2i": recall_at(sub[1], sub[0], sub[3], sub[2], RECALL_KS, chunk),
    }
    ref = {
        "i2t": reference_recall(sub[0], sub[1], sub[2], sub[3]),
        "t2i": reference_recall(sub[1], sub[0], sub[3], sub[2]),
    }
    full_mb = 4 * n * n * per / MB
    return {
        "images": n,
        "captions": n * per,
        "dim": dim,
        "chunk": chunk,
        "noise": spec["noise"],
        "recall": {"i2t": i2t, "t2i": t2i},
        "full_matrix_mb": full_mb,
        "chunk_block_mb": {"i2t": 4 * chunk * n * per / MB, "t2i": 4 * chunk * n / MB},
        "reference": {
            "images": m,
            "captions": m * per,
            "chunked": got,
            "naive": ref,
            "equal": got == ref,
        },
        **chunked,
    }


CHILDREN = {"knn": child_knn, "zeroshot": child_zeroshot, "retrieval": child_retrieval}


def _child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    result = CHILDREN[spec["kind"]](spec)
    result["child_seconds"] = time.perf_counter() - start
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def run_child(kind: str, spec: dict, timeout: float, allocator: str = "glibc") -> dict:
    """``CHILDREN[kind](spec)`` in a fresh interpreter under ``ALLOCATORS[allocator]``; its
    result plus its wall seconds."""
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        spec = dict(spec, kind=kind, out=str(Path(tmp) / "out.json"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "dist_contrast_bench.eval_runs", str(spec_path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(ALLOCATORS[allocator], OMP_NUM_THREADS=str(spec["threads"]))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"bench eval child '{kind}' failed ({proc.returncode}):\n{tail}")
        result = json.loads(Path(spec["out"]).read_text())
    result["wall_seconds"] = wall
    result["allocator"] = allocator
    return result


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1]))
