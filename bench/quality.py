"""Representation quality of every method on the built-in digits, side by side in one run.

    dist-contrast bench quality [--configs simclr,supcon] [--steps 200] [--nproc 2]
                                [--set section.key=value ...] [--out bench/results/quality.json]
                                [--root .]

For each ``configs/*_digits.yaml`` of the checkout ``--root`` (default: the current folder;
globbed when it runs; ``--configs`` picks some by name or path), train it on ``--nproc`` local
ranks with the checkout's ``launch/local.sh`` (what ``make train`` runs),
then evaluate the last checkpoint (``dist-contrast eval``): kNN top-1 and linear-probe top-1 on
the validation split, for the trained encoder and the same architecture at its initial
weights. Runs go to ``runs/quality/<config>/`` (replaced on each call; the log of the training
is ``train.log`` there). Prints a table and writes it as JSON with the command and the machine.
Train time is the wall time of the launcher (process start and DeepSpeed set-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dist_contrast.config import load_config
from dist_contrast_bench.common import cpu_model, default_out, usable_cores, write_json

COLUMNS = ("knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init")


def find_configs(names: str, root: Path) -> list[Path]:
    """The digits configs of ``root/configs``, all of them (sorted) or those named (``simclr``
    or a path)."""
    found = sorted((root / "configs").glob("*_digits.yaml"))
    if not names:
        return found
    picked = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        path = Path(name)
        if not path.is_file():
            path = root / "configs" / f"{name.removesuffix('_digits')}_digits.yaml"
        if not path.is_file():
            known = ", ".join(p.stem.removesuffix("_digits") for p in found)
            raise SystemExit(f"bench quality: no config {name!r} (known: {known})")
        picked.append(path)
    return picked


def machine() -> str:
    cpu = cpu_model()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    cores = usable_cores()
    return f"{platform.system()} {cpu}, {cores} cores{gpu}, torch {torch.__version__}"


def _watch(metrics: Path, steps: int, stop: threading.Event, every: float) -> None:
    """Print the last logged step of a running training now and then."""
    start = time.monotonic()
    while not stop.wait(every):
        try:
            last = json.loads(metrics.read_text().splitlines()[-1])
            where = f"step {last['step']}/{steps}, loss {last['loss']:.4f}"
        except (OSError, IndexError, ValueError, KeyError):
            where = "starting"
        print(f"    {where} ({time.monotonic() - start:.0f} s)", flush=True)


def train_and_eval(config: Path, args: argparse.Namespace) -> dict:
    """Train one config, evaluate it; a row of the table (``status`` says if it failed)."""
    overrides = list(args.set)
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    config = config.resolve()
    cfg = load_config(config, overrides)
    name = config.stem.removesuffix("_digits")
    method = cfg.method.name if cfg.loss.name in (cfg.method.name, "ntxent") else None
    row: dict = {
        "config": config.relative_to(args.root).as_posix()
        if config.is_relative_to(args.root)
        else str(config),
        "method": method or f"{cfg.method.name} ({cfg.loss.name})",
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "nproc": args.nproc,
    }
    run_root = Path(args.run_dir).resolve()
    run = run_root / name
    shutil.rmtree(run, ignore_errors=True)
    run_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(args.root / "launch" / "local.sh"),
        str(args.nproc),
        str(config),
        f"run.dir={run_root}",
        f"run.name={name}",
        "logging.progress=false",
        "logging.wandb=false",
        *overrides,
    ]
    env = dict(os.environ, PYTHON=sys.executable)
    log = run_root / f"{name}.train.log"
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(run / "metrics.jsonl", cfg.train.steps, stop, args.progress_every)
    )
    start = time.monotonic()
    watcher.start()
    try:
        with log.open("w") as out:
            rc = subprocess.run(
                cmd, cwd=args.root, env=env, stdout=out, stderr=subprocess.STDOUT
            ).returncode
    finally:
        stop.set()
        watcher.join()
    row["train_s"] = time.monotonic() - start
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        row["status"] = f"training failed (exit {rc}): {tail[0][:200]}"
        return row
    if run.is_dir():
        shutil.move(log, run / "train.log")
    from dist_contrast.eval.run import evaluate_run

    result = evaluate_run(run)
    row.update({k: result[k] for k in COLUMNS})
    row["status"] = "ok"
    return row


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(rows: list[dict], header: str = "") -> str:
    """The rows as a text table: top-1 in percent, train time in seconds."""
    head = (
        f"{'method':<22} {'kNN trained':>11} {'kNN init':>9} {'linear trained':>14} "
        f"{'linear init':>11} {'train s':>8}"
    )
    lines = ([header] if header else []) + [head]
    for r in rows:
        cells = [_pct(r.get(k)) for k in COLUMNS]
        line = (
            f"{r['method']:<22} {cells[0]:>11} {cells[1]:>9} {cells[2]:>14} {cells[3]:>11} "
            f"{r.get('train_s', 0):>8.0f}"
        )
        if r.get("status", "ok") != "ok":
            line += f"  {r['status']}"
        lines.append(line)
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench quality", description=__doc__.strip().splitlines()[0]
    )
    p.add_argument("--configs", default="", help="names or paths, comma-separated (default: all)")
    p.add_argument("--steps", type=int, default=0, help="train.steps for every run (0: config's)")
    p.add_argument("--nproc", type=int, default=2, help="local ranks (launch/local.sh)")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    p.add_argument("--run-dir", default="runs/quality")
    p.add_argument("--out", default=default_out("quality.json"))
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between lines")
    p.add_argument(
        "--root", default=".", help="checkout with configs/ and launch/local.sh (default: .)"
    )
    args = p.parse_args(argv)
    if args.steps < 0 or args.nproc < 1:
        p.error("--steps must be >= 0 and --nproc >= 1")
    args.root = Path(args.root).resolve()
    if not (args.root / "launch" / "local.sh").is_file():
        p.error(f"{args.root} has no launch/local.sh: run it from a checkout, or pass --root")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    configs = find_configs(args.configs, args.root)
    rows = []
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config.name}: training on {args.nproc} ranks", flush=True)
        row = train_and_eval(config, args)
        rows.append(row)
        print(f"[{i}/{len(configs)}] {config.name}: {row['status']}, {row['train_s']:.0f} s")
    header = f"Top-1 (%) on the digits validation split, {args.nproc} ranks; {machine()}"
    print(table(rows, header))
    result = {
        "machine": machine(),
        "command": "dist-contrast bench quality " + " ".join(argv),
        "metrics": "top-1 on the validation split: kNN (k = eval.knn_k, cosine, weighted) and "
        "linear probe (logistic regression on frozen features), trained and initial weights",
        "train_s": "wall time of launch/local.sh, process start and DeepSpeed set-up included",
        "results": rows,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
