"""What the checkpoint manifests cost: hashing a step at save and verifying it at resume, next to
the save and the load themselves, on a CLIP ViT-B/16 with Adam states (the price of trusting a
checkpoint only once it matches its manifest).

    dist-contrast bench checkpoint [--repeats 3] [--dir DIR] [--config CONFIG] [--quick]

The model is ``configs/image_text/clip_vit_b16.yaml`` at random weights (ViT-B/16 image tower,
12-layer text transformer of width 512; the byte tokenizer stands in for the run's BPE file, so
the token embedding is 259 rows, not 49,408), one process, DeepSpeed ZeRO-2 in fp32 so that
every state is whole in the files: the module (fp32) and the optimizer's fp32 master weights and
both Adam moments, after one step on a batch of 2. Per round, on that same checkpoint:

- save: ``engine.save_checkpoint`` + the rank file, as :func:`checkpoint.save` writes them;
- seal: the manifest (size and SHA-256 of every file, :func:`checkpoint.seal`), which
  :func:`checkpoint.save` adds to each save;
- verify: :func:`integrity.verify` (what a resume, ``eval`` or ``export`` does first);
- load: :func:`checkpoint.load` (DeepSpeed's load, every file ``weights_only=True``);
- load (unsafe): ``engine.load_checkpoint`` as DeepSpeed ships it (``weights_only=False``),
  for what the safe loading itself costs.

Reads are timed twice: warm (the files in the page cache, as right after a save) and cold (each
file's cached pages dropped first with ``posix_fadvise(DONTNEED)``, as on a resume after a
restart; a network file system may be slower still). The figure is the median over
``--repeats`` rounds. Results: a table, and bench/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_contrast_bench.common import (
    cpu_model,
    default_out,
    package_version,
    usable_cores,
    write_json,
)

CONFIG = "configs/image_text/clip_vit_b16.yaml"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dist-contrast bench checkpoint", description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--quick", action="store_true", help="a ViT-tiny CLIP: a check, no figures")
    p.add_argument("--out", default=default_out("checkpoint.json"))
    return p.parse_args(argv)


def _engine(config: str, quick: bool, run_dir: Path):
    from dist_contrast.config import load_config
    from dist_contrast.methods import build_method
    from dist_contrast.train.setup import wrap

    overrides = [
        f"run.dir={run_dir}",
        "data.tokenizer=bytes",
        "data.tokenizer_path=",
        "deepspeed.precision=fp32",
        "deepspeed.zero_stage=2",
        "train.batch_size=2",
    ]
    if quick:
        overrides += ["model.encoder=vit_tiny", "text.layers=2", "data.image_size=32"]
        overrides += ["model.patch_size=8"]
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    engine, _, scheduler = wrap(method, cfg, 1)
    size = cfg.data.image_size
    batch = {
        "view1": torch.randn(2, cfg.data.channels, size, size),
        "tokens": torch.randint(3, 200, (2, cfg.data.context_length)),
        "label": torch.tensor([0, 1]),
        "index": torch.tensor([0, 1]),
    }
    out = engine(batch)  # one step: Adam's moments exist, as in any checkpoint past step 0
    engine.backward(out.loss)
    engine.step()
    params = sum(p.numel() for p in method.parameters())
    return engine, scheduler, params


def _drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed(fn, folder: Path | None = None) -> float:
    if folder is not None:
        _drop_cache(folder)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _round(engine, scheduler, root: Path, step: int) -> dict[str, float]:
    from dist_contrast.train import checkpoint, integrity

    tag = checkpoint.step_tag(step)
    rank_state = {"world": 1, "data": {}, "method": {}, "rng": checkpoint.rng_state()}
    client = {"scheduler": scheduler.state_dict(), "step": step}

    def save() -> None:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        torch.save(rank_state, checkpoint.rank_file(root / tag, 0))

    folder = root / tag
    row = {"save": _timed(save)}
    row["seal"] = _timed(lambda: checkpoint.seal(folder, step))
    (root / checkpoint.LATEST).write_text(tag + "\n")
    for cache, drop in (("warm", None), ("cold", folder)):
        row[f"verify_{cache}"] = _timed(lambda: _must_verify(integrity, folder), drop)
        row[f"load_{cache}"] = _timed(lambda: checkpoint.load(engine, folder), drop)
        unsafe = lambda: engine.load_checkpoint(str(root), tag=tag)  # noqa: E731
        row[f"load_unsafe_{cache}"] = _timed(unsafe, drop)
    row["bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return row


def _must_verify(integrity, folder: Path) -> None:
    damage = integrity.verify(folder)
    if damage:
        raise RuntimeError(f"the fresh checkpoint does not verify: {damage}")


COLUMNS = (
    ("save", "save"),
    ("seal", "+ manifest (hash)"),
    ("verify_warm", "verify, warm"),
    ("load_warm", "load, warm"),
    ("load_unsafe_warm", "load weights_only=False, warm"),
    ("verify_cold", "verify, cold"),
    ("load_cold", "load, cold"),
    ("load_unsafe_cold", "load weights_only=False, cold"),
)


def _table(med: dict[str, float], result: dict) -> str:
    gb = med["bytes"] / 1e9
    lines = [
        f"checkpoint of {result['parameters'] / 1e6:.1f}M parameters + Adam, "
        f"{gb:.2f} GB in {result['files']} files; {result['cpu']}, {result['cores']} cores; "
        f"median of {result['repeats']} rounds",
        "",
        "| phase | seconds | GB/s | vs its load / save |",
        "|---|---|---|---|",
    ]
    for key, name in COLUMNS:
        ref = med["save"] if key == "seal" else med.get(key.replace("verify", "load"))
        ratio = f"{med[key] / ref:.2f}x" if key.startswith(("verify", "seal")) else ""
        lines.append(f"| {name} | {med[key]:.2f} | {gb / med[key]:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    from dist_contrast import distributed

    distributed.init()
    try:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-checkpoint-") as tmp:
            root = Path(tmp) / "checkpoints"
            root.mkdir()
            engine, scheduler, params = _engine(args.config, args.quick, Path(tmp))
            rows = []
            for r in range(args.repeats):
                rows.append(_round(engine, scheduler, root, r + 1))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                      if k != "bytes"), file=sys.stderr, flush=True)  # fmt: skip
            files = len([p for p in (root / "step_00000001").rglob("*") if p.is_file()])
    finally:
        distributed.shutdown()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = {
        "config": args.config,
        "quick": args.quick,
        "parameters": params,
        "files": files,
        "repeats": args.repeats,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "median_seconds": {k: v for k, v in med.items() if k != "bytes"},
        "bytes": med["bytes"],
        "rounds": rows,
        "command": "dist-contrast bench checkpoint " + " ".join(argv or sys.argv[1:]),
    }
    print(_table(med, result))
    if not args.quick:
        print(f"wrote {write_json(args.out, result)}")
    return 0
