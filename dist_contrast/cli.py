"""``dist-contrast train|eval|export|shards``: thin commands over the library.

Errors a user can cause are printed as one line (``dist-contrast: error: ...``) with a non-zero
exit code, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

from dist_contrast.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from dist_contrast.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check:
        from dist_contrast.train.setup import prepare

        world = prepare(cfg, args.world, thorough=True)
        print(f"config ok for {world} rank(s): run dir {cfg.run_dir}")
        return 0
    from dist_contrast.train import preempt
    from dist_contrast.train.engine import train

    evaluate = None
    if cfg.eval.every:
        from dist_contrast.eval.figures import periodic

        evaluate = periodic(cfg)
    try:
        run_dir = train(cfg, evaluate)
    except preempt.Preempted as stopped:  # "preempted at step N; ..." last, and its exit code
        return preempt.leave(stopped)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run finished: {run_dir}")
    return 0


def _cmd_eval_export(args: argparse.Namespace) -> int:
    from dist_contrast.eval.export import evaluate_export

    if not args.data:
        raise UserError("eval --export needs --data SHARDS (labelled or captioned shards)")
    result = _distributed(evaluate_export, args.export, args.data, args.val_data)
    if not distributed_main():
        return 0
    if not args.brief:
        print(json.dumps(result, indent=1))
    if "knn_top1" in result:
        print(
            f"kNN top-1 on {result['val_samples']} samples: {100 * result['knn_top1']:.1f}%; "
            f"linear probe: {100 * result['linear_top1']:.1f}% ({result['split']})"
        )
    _print_image_text(result)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dist_contrast.export import ExportOptions, export_run

    opts = ExportOptions(
        torchscript=args.torchscript,
        onnx=args.onnx,
        force=args.force,
        format=args.format,
        step=args.step,
    )
    out, manifest = export_run(args.run, args.out, opts)
    towers = ", ".join(
        f"{k} ({v['parameters']:,} parameters)" for k, v in manifest["towers"].items()
    )
    print(f"exported {manifest['checkpoint']} of {args.run}: {towers}; written to {out}")
    return 0


def _distributed(fn, *args):
    """``fn(*args)`` on every rank when a launcher started several (torchrun), else here."""
    from dist_contrast import distributed

    if distributed.detect_env().world_size <= 1:
        return fn(*args)
    distributed.init()
    try:
        return fn(*args)
    finally:
        distributed.shutdown()


def distributed_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.export and args.step is not None:
        raise UserError("--step goes with --run (an export holds one set of weights)")
    if args.export and args.overrides:
        raise UserError("eval.key=value overrides go with --run (an export has no run config)")
    if args.export:
        return _cmd_eval_export(args)
    if args.data or args.val_data:
        raise UserError("--data and --val-data go with --export (a run is evaluated on its own)")
    from dist_contrast.eval.run import evaluate_run

    result = _distributed(evaluate_run, args.run, True, args.overrides, args.step)
    if not distributed_main():
        return 0
    if not args.brief:
        print(json.dumps(result, indent=1))
    if "knn_top1" in result:  # the probes need labels: an unlabelled set has none
        gain = result["knn_top1"] - result["knn_top1_random_init"]
        print(
            f"kNN top-1 on {result['val_samples']} validation samples: trained "
            f"{100 * result['knn_top1']:.1f}%, random init "
            f"{100 * result['knn_top1_random_init']:.1f}% ({100 * gain:+.1f} points); linear "
            f"probe: trained {100 * result['linear_top1']:.1f}%, random init "
            f"{100 * result['linear_top1_random_init']:.1f}%; written to {args.run}/eval.json"
        )
    else:
        print(f"no labels: no kNN or linear probe; written to {args.run}/eval.json")
    _print_image_text(result)
    return 0


def _print_image_text(result: dict) -> None:
    if "zeroshot_top1" in result or "i2t_r1" in result:
        from dist_contrast.eval.image_text import summary

        print(summary(result))


def _cmd_shards(args: argparse.Namespace) -> int:
    from dist_contrast.data.write.digits import write_digits

    counts = write_digits(args.out, args.shard_size, args.val_fraction, args.seed, args.force)
    for split, info in counts.items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}/counts.json")
    return 0


def _shard_options(args: argparse.Namespace):
    from dist_contrast.data.write import ShardOptions

    return ShardOptions(
        prefix=args.prefix,
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        max_image_pixels=args.max_image_pixels,
        force=args.force,
    )


def _report_write(result, out: str) -> int:
    for split, info in result.counts.items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    if result.skipped:
        total = sum(info["samples"] for info in result.counts.values()) + len(result.skipped)
        print(
            f"dist-contrast: warning: skipped {len(result.skipped)} of {total} file(s) "
            "(missing, unreadable, too large or not UTF-8 named):",
            file=sys.stderr,
        )
        for source, why in result.skipped[:5]:
            print(f"  {source}: {why}", file=sys.stderr)
        if len(result.skipped) > 5:
            print(f"  ... and {len(result.skipped) - 5} more", file=sys.stderr)
    print(f"wrote {out}/counts.json")
    return 0


def _cmd_shards_folder(args: argparse.Namespace) -> int:
    from dist_contrast.data.write import write_folder

    return _report_write(write_folder(args.root, args.out, _shard_options(args)), args.out)


def _cmd_shards_csv(args: argparse.Namespace) -> int:
    from dist_contrast.data.write import write_csv

    return _report_write(write_csv(args.csv, args.out, _shard_options(args)), args.out)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from dist_contrast.data.tokenizer import train_bpe_from_shards

    tok, seen = train_bpe_from_shards(args.shards, args.vocab_size)
    tok.save(args.out)
    print(f"trained BPE on {seen} captions: vocab size {tok.vocab_size}; wrote {args.out}")
    return 0


BENCH_PACKAGE = "dist_contrast_bench"  # the folder bench/, installed with this package


def _bench_module(name: str):
    """``dist_contrast_bench.NAME``, or None when there is no such module. A module that exists
    but fails to import raises (a broken benchmark is not an unknown name)."""
    import importlib

    if not name.isidentifier():
        return None
    full = f"{BENCH_PACKAGE}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == BENCH_PACKAGE:
            raise UserError(
                f"the benchmarks ({BENCH_PACKAGE}) are not installed: reinstall dist-contrast "
                "(pip install -e . in a checkout)"
            ) from None
        if exc.name == full:
            return None
        raise


def _benchmarks() -> list[str]:
    """Names of the modules of the bench package that expose ``main`` (helpers do not)."""
    import importlib
    import pkgutil

    package = importlib.import_module(BENCH_PACKAGE)
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{BENCH_PACKAGE}.{info.name}")
        except ImportError:  # listed for an error message only: skip what cannot load here
            continue
        if callable(getattr(module, "main", None)):
            names.append(info.name)
    return sorted(names)


def _cmd_plan(args: argparse.Namespace) -> int:
    from dist_contrast.config import load_config
    from dist_contrast.train.plan import plan, table

    if args.gpus < 1:
        raise UserError(f"plan --gpus must be at least 1, not {args.gpus}")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise UserError(f"plan --gpu-memory must be positive (GB), not {args.gpu_memory}")
    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.gpus, args.gpu_memory, args.vocab_size)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run ``main(ARGS)`` of the benchmark ``dist_contrast_bench.NAME``."""
    module = _bench_module(args.name)
    if not callable(getattr(module, "main", None)):
        available = ", ".join(_benchmarks()) or "none"
        raise UserError(f"no benchmark '{args.name}' (available: {available})")
    return int(module.main(list(args.args)) or 0)


FORCE_HELP = (
    "write into a folder that is not empty: the shards of the splits written now replace "
    "those there (PREFIX-*.tar, val-*.tar, their counts.json entries); other files stay"
)


def _pixel_count(text: str) -> int:
    """``--max-image-pixels``: a whole number, written as 64000000 or 64e6."""
    try:
        value = float(text)
        if value.is_integer():
            return int(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"expected a whole number of pixels such as 64e6, got {text!r}"
    )


def _add_writer_options(p: argparse.ArgumentParser) -> None:
    from dist_contrast.data.write.inputs import MAX_IMAGE_PIXELS

    p.add_argument("--out", required=True, help="output folder (new or empty, unless --force)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="max samples per shard (default: 1000)"
    )
    p.add_argument(
        "--max-shard-bytes", type=float, help="max bytes per shard, e.g. 1e9 (default: no limit)"
    )
    p.add_argument(
        "--max-image-pixels",
        type=_pixel_count,
        default=MAX_IMAGE_PIXELS,
        help="larger images are skipped and reported, read from their header (default: "
        f"{MAX_IMAGE_PIXELS:,}, as data.max_image_pixels)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="held out as val-*.tar (default: 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--workers", type=int, default=1, help="writer processes (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-contrast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a config (one process, or under torchrun/srun/deepspeed)"
    )
    p.add_argument("--config", required=True, help="YAML config, a diff over the defaults")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--check", action="store_true", help="validate config and paths, then exit")
    p.add_argument(
        "--world",
        type=int,
        help="with --check: the ranks the job will have (default: the launcher's, else 1)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="kNN and linear-probe evaluation of a run or an export")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        help="run directory (runs/NAME): its latest checkpoint; under torchrun write --run-dir "
        "(torchrun's own parser takes --run for its --run-path)",
    )
    which.add_argument("--export", help="export directory (from dist-contrast export)")
    p.add_argument("--data", help="with --export: labelled shards the probes are fitted on")
    p.add_argument("--val-data", help="with --export: shards measured on (default: 20%% of --data)")
    p.add_argument(
        "--brief", action="store_true", help="the summary only (eval.json holds every figure)"
    )
    p.add_argument(
        "--step", type=int, help="with --run: the checkpoint of this step (default: latest)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="with --run: eval.key=value settings for this evaluation (eval.batch_size, "
        "eval.feature_dtype, eval.bank_memory_mb, ...); the rest is the run's",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "export", help="a run's latest checkpoint -> fp32 safetensors per tower, config, card"
    )
    p.add_argument("--run", required=True, help="run directory (runs/NAME)")
    p.add_argument("--out", help="export directory (default: RUN/export)")
    p.add_argument("--torchscript", action="store_true", help="also TOWER/model.pt (traced)")
    p.add_argument("--onnx", action="store_true", help="also TOWER/model.onnx (needs onnx)")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: latest)")
    p.add_argument(
        "--format",
        choices=("native", "hf", "open_clip"),
        default="native",
        help="native: this package's layout (load_encoder, load_clip); hf: a folder that "
        "transformers loads as it is (CLIPModel, SiglipModel, ViTModel, CLIPVisionModel, "
        "SiglipVisionModel, ResNetModel); "
        "open_clip: a folder open_clip loads as 'local-dir:DIR' (CLIP and SigLIP runs with a "
        "CLIP-layout ViT)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("shards", help="write WebDataset shards")
    shard_sub = p.add_subparsers(dest="source", required=True)
    d = shard_sub.add_parser("digits", help="scikit-learn's digits, with a fixed train/val split")
    d.add_argument("--out", required=True, help="output folder (new or empty, unless --force)")
    d.add_argument("--force", action="store_true", help=FORCE_HELP)
    d.add_argument("--shard-size", type=int, default=200)
    d.add_argument("--val-fraction", type=float, default=0.2)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_shards)
    f = shard_sub.add_parser(
        "folder", help="an image folder: ROOT/<class>/*.jpg, or ROOT/*.jpg with x.txt captions"
    )
    f.add_argument("root", help="the image folder")
    _add_writer_options(f)
    f.set_defaults(func=_cmd_shards_folder)
    c = shard_sub.add_parser(
        "csv",
        help="a CSV with a header and columns path,caption "
        "(missing or unreadable images are skipped and reported)",
    )
    c.add_argument("csv", help="the CSV file; relative paths are taken from its folder")
    _add_writer_options(c)
    c.set_defaults(func=_cmd_shards_csv)

    p = sub.add_parser("tokenizer", help="caption tokenizers")
    tok_sub = p.add_subparsers(dest="action", required=True)
    t = tok_sub.add_parser("train", help="train a byte-level BPE on the captions (txt) of shards")
    t.add_argument("--shards", required=True, help="shard pattern, e.g. 'data/train-*.tar'")
    t.add_argument("--vocab-size", type=int, required=True, help="e.g. 8192")
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("plan", help="memory and communication per GPU of a config on N GPUs")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, default=None, help="GB per GPU: the largest batch")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=49408,
        help="text vocabulary when the config's tokenizer file is not here (default: OpenAI's)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "bench", help="run a benchmark of dist_contrast_bench (prints a table, writes JSON)"
    )
    p.add_argument("name", help="benchmark name, e.g. losses (an unknown name lists them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_cmd_bench)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher passes ``--local_rank=N`` first; its env already says the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        _error(f"dist-contrast: error: {_where()}{exc}")
        return 2
    except KeyboardInterrupt:
        print("dist-contrast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from dist_contrast.distributed import peer_gone

        said = peer_gone(exc)
        if _where() and said:  # another rank ended first: its own message is the cause
            print(f"dist-contrast: {_where()}stopped: another rank ended ({said})", file=sys.stderr)
            return 1
        traceback.print_exc()  # a bug or an unforeseen fault: the traceback, then one line
        _error(f"dist-contrast: error: {_where()}{type(exc).__name__}: {exc}")
        return 1


def _error(line: str) -> None:
    """Print a rank's one-line error; also append it to ``$DIST_CONTRAST_ERROR_FILE`` when the
    launcher set one (launch/local.sh, slurm/train.sbatch), which prints the first line there
    last, after torchrun's or srun's own report: the cause is the last thing the user reads."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("DIST_CONTRAST_ERROR_FILE")
    if path:
        first = line.splitlines()[0] if line else line
        try:
            with open(path, "a") as f:  # one short write: whole lines, whichever rank is first
                f.write(first + "\n")
        except OSError:
            pass


def _where() -> str:
    """``[rank R] `` in a job of several ranks, else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
