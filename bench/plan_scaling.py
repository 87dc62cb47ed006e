"""``dist-contrast bench plan_scaling``: the planner's tables of docs/scaling.md.

CLIP ViT-B/16 (configs/image_text/clip_vit_b16.yaml) and ViT-L/14 (the same with OpenAI's
ViT-L/14 sizes) at global batches 32k, 64k, 256k and 1M on 8 to 1,024 GPUs of 80 GB, with the
local loss and the tiled one: memory per GPU, the largest batch that fits, the bytes a rank
sends per step and, at 400 Gb/s per node (8 GPUs), the time they take. Each model's
activations are counted once (a few minutes on a CPU for ViT-L/14).

    dist-contrast bench plan_scaling [--out bench/results/scaling.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dist_contrast.config import load_config
from dist_contrast.train.plan import (
    GIB,
    largest_batch,
    memory_terms,
    plan_for,
    read_model,
    total,
)
from dist_contrast_bench.common import default_out, write_json

B16 = "configs/image_text/clip_vit_b16.yaml"
MODELS = {
    "ViT-B/16": (B16, []),
    "ViT-L/14": (
        B16,
        [
            *("model.vit_width=1024", "model.vit_depth=24", "model.vit_heads=16"),
            *("model.patch_size=14", "model.proj_dim=768"),
            *("text.width=768", "text.layers=12", "text.heads=12"),
        ],
    ),
}
GPUS = [8, 64, 256, 1024]
BATCHES = [32_768, 65_536, 262_144, 1_048_576]
MEMORY_GB = 80
NODE_BYTES_PER_S = 400e9 / 8  # 400 Gb/s per node: the link a ring crosses between nodes
MICRO = 256  # samples per micro-batch under cached accumulation
ACHIEVED_FLOPS = 400e12  # bf16 per H100, 40% of the 989 TFLOP/s dense peak: an assumption


def flops_per_sample(cfg) -> float:
    """Forward + backward FLOPs of one sample of the config's method (torch's FLOP counter over
    two samples, halved; the byte tokenizer, as an embedding lookup counts none), for the
    compute time a step's communication is set against."""
    from torch.utils.flop_counter import FlopCounterMode

    from dist_contrast.methods import build_method
    from dist_contrast.train.plan import example_batch

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="bytes"))
    method = build_method(cfg)
    counter = FlopCounterMode(display=False)
    with counter:
        method(example_batch(cfg, 2)).loss.backward()
    return counter.get_total_flops() / 2


def rows_for(name: str, config: str, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides)
    print(f"{name}: counting activations ...", file=sys.stderr, flush=True)
    model = read_model(cfg, vocab_size=49408)
    ckpt_cfg = load_config(config, [*overrides, "model.activation_checkpointing=true"])
    ckpt = read_model(ckpt_cfg, vocab_size=49408)

    def loss(c, tiled: bool):
        return dataclasses.replace(c, loss=dataclasses.replace(c.loss, memory_efficient=tiled))

    variants = {  # name: (config, model)
        "local": (loss(cfg, False), model),
        "tiled": (loss(cfg, True), model),
        "tiled_ckpt": (loss(ckpt_cfg, True), ckpt),
    }
    out = {"model": name, "trainable": model.trainable, "per_sample": model.per_sample}
    out["flops_per_sample"] = flops_per_sample(cfg)
    out["per_sample_ckpt"] = ckpt.per_sample
    out["rows"] = []
    out["largest"] = {
        v: {w: largest_batch(c, m, w, MEMORY_GB * 1e9) for w in GPUS}
        for v, (c, m) in variants.items()
    }
    out["largest"]["tiled_ckpt_cached"] = {
        w: largest_cached(loss(ckpt_cfg, True), ckpt, w, MEMORY_GB * 1e9) for w in GPUS
    }
    for w in GPUS:
        for batch in BATCHES:
            n = batch // w
            row = {"gpus": w, "global_batch": batch, "per_gpu": n}
            for v, (c, m) in variants.items():
                r = plan_for(c, m, w, n, None)
                row[v] = r["total_bytes"]
                row[f"{v}_terms"] = {t["name"]: t["bytes"] for t in r["terms"]}
            row["compute_s"] = n * out["flops_per_sample"] / ACHIEVED_FLOPS
            row["sent"] = r["comm_bytes"]
            row["wire"] = r["wire_bytes"]
            row["comm"] = {t["name"]: t["bytes"] for t in r["comm"]}
            out["rows"].append(row)
    return out


def largest_cached(cfg, model, gpus: int, budget: float, micro: int = MICRO) -> int:
    """The largest batch per GPU under cached accumulation (GradCache) in micro-batches of
    ``micro``: the activations stay a micro-batch's, the loss and the embeddings grow."""

    def fits(k: int) -> bool:
        train = dataclasses.replace(cfg.train, accumulation=k, accumulation_mode="cached")
        c = dataclasses.replace(cfg, train=train)
        return total(memory_terms(c, model, k * micro, gpus)) <= budget

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * micro


def markdown(t: dict) -> str:
    lines = [
        f"### CLIP {t['model']}: {t['trainable']:,} parameters, "
        f"{t['per_sample'] / 2**20:.1f} MiB of activations per sample in bf16 "
        f"({t['per_sample_ckpt'] / 2**20:.1f} with activation checkpointing), "
        f"{t['flops_per_sample'] / 1e9:.0f} GFLOP per sample (forward + backward)",
        "",
        "| GPUs | global batch | per GPU | GiB/GPU: local loss | tiled | tiled + act. ckpt | "
        "sent/rank/step (GiB) | on the wire (GiB) | comm at 400 Gb/s/node (s) | compute (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in t["rows"]:

        def mem(v):
            s = f"{v / GIB:.1f}"
            return s if v <= MEMORY_GB * 1e9 else f"{s} (no)"

        time = f"{r['wire'] / NODE_BYTES_PER_S:.2f}" if r["gpus"] > 8 else "one node"
        lines.append(
            f"| {r['gpus']:,} | {r['global_batch']:,} | {r['per_gpu']:,} | {mem(r['local'])} | "
            f"{mem(r['tiled'])} | {mem(r['tiled_ckpt'])} | {r['sent'] / GIB:.2f} | "
            f"{r['wire'] / GIB:.2f} | {time} | {r['compute_s']:.3f} |"
        )
    lines += ["", f"Largest global batch in {MEMORY_GB} GB per GPU:", ""]
    lines += [
        f"| GPUs | local loss | tiled | tiled + act. ckpt | tiled + act. ckpt + cached "
        f"accumulation (micro-batches of {MICRO}) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for w in GPUS:
        cells = [t["largest"][v][w] for v in ("local", "tiled", "tiled_ckpt", "tiled_ckpt_cached")]
        lines.append(f"| {w:,} | " + " | ".join(f"{n * w:,} ({n:,}/GPU)" for n in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-contrast bench plan_scaling", description=__doc__)
    parser.add_argument("--out", default=default_out("scaling.json"))
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="default: all")
    args = parser.parse_args(argv)
    tables = [rows_for(name, *MODELS[name]) for name in args.model or MODELS]
    for t in tables:
        print(markdown(t) + "\n", flush=True)
    print(f"wrote {write_json(args.out, tables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
