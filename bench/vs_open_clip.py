"""dist-contrast against open_clip_train (open-clip-torch 3.3.0), side by side on this machine:
the same shards, tokens, architecture and recipe, interleaved runs.

    make open-clip-env          # once: open_clip in .venv-open-clip (bench/open_clip_env.sh)
    dist-contrast bench vs_open_clip [CONFIG] [KEY=VALUE ...] [--size small|compute] [--pairs 3]
        [--vary-seed] [--no-eval] [--val-data GLOB] [--only ours|open_clip]
        [--load K] [--steps N] [--data GLOB] [--tokenizer FILE] [--nproc 2]
        [--open-clip-python .venv-open-clip/bin/python] [--dir DIR] [--out FILE]

From one of our CLIP configs (default configs/clip_vit_digits.yaml; ``--size compute`` sets the
compute-bound size over it, where the step and not the loader sets the pace: ViT 192 x 12
layers, 3 heads, patch 8, 64 px, text 256 x 4, 50 steps x 64 per rank) the bench writes

- an open_clip model config of the same architecture (:func:`open_clip_model_config`: our
  ``vit_layout=clip`` ViT and causal text transformer are OpenAI's layout, which open_clip's
  ``VisionTransformer`` and ``TextTransformer`` follow; pooled at the first end-of-text token,
  LayerNorm eps and activation as ours, the initial logit scale 1 / ``loss.temperature``). Its
  parameter count is checked equal to ours (open_clip's patch convolution takes 3 channels, so
  ours is run with ``data.channels=3``: the digits' grey images repeated);
- our BPE tokenizer as transformers files (``dist_contrast.export.hf.write_tokenizer``) that
  open_clip's ``HFTokenizer`` loads; the ids of a few captions are checked equal to ours;

then runs, ``--pairs`` times, ours (``torchrun -m dist_contrast.cli train``) and then
open_clip's (``torchrun bench/open_clip_launch.py``, open_clip_train.main with the model config
registered), each with ``--nproc`` ranks (gloo, fp32, OMP_NUM_THREADS=1 per rank, one loader
worker per rank), the same global batch and steps, AdamW with the same lr, betas (0.9, 0.999),
eps 1e-8, weight decay, gradient clipping, linear warm-up then cosine to 0 (ours with
``train.min_lr_ratio=0``), in-batch negatives gathered from every rank with gradient, each rank
scoring its own rows (open_clip's ``--local-loss --gather-with-grad``). open_clip reads the same
shards (``--dataset-type webdataset --dataset-resampled``; keys png and txt) with its
RandomResizedCrop at ours ``augment.crop_scale_min``. Differences that remain: the augmentation
beyond the crop (ours rotates and translates), which parameters are decayed (open_clip spares
every 1-d parameter and those named ln/bias/logit_scale, ours every parameter of ndim <= 1:
open_clip's class embedding is 1-d, ours 3-d), and random initialisation draws.

Figures of each run: steady samples/s (from each trainer's own log windows, the windows that
end after ``--skip`` steps: ours ``samples_per_sec`` of metrics.jsonl, open_clip's ``Batch (t)``
mean of its log lines; both wall clock per step including the wait for data), the whole run's
wall time (start-up included), peak RSS of each rank process (VmHWM, polled every 0.2 s; the
loader workers are processes of their own, not counted) and the final loss (ours: mean over the
last log window and the ranks; open_clip: the last logged step's, rank 0: it logs no mean).
``--load K`` runs K busy processes (a pure-Python loop each) beside every run and ends them.

One evaluator for both (``--no-eval``: none): after each run, our ``dist-contrast eval``
figures (zero-shot top-1 on ``--val-data`` with the config's held-out prompt templates, kNN
and linear-probe top-1, retrieval) of our method loaded with that run's final weights: ours
from its last checkpoint, open_clip's from its ``epoch_1.pt`` mapped key by key into our
layout (:func:`from_open_clip`). Before the runs, open_clip's freshly built model, mapped the
same way, gives its own image and text features to within float rounding in our model: the
check that the two architectures are one.

Results: a markdown table, and ``--out`` (default bench/results/vs_open_clip.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_contrast_bench.common import cpu_model, default_out, usable_cores, write_json

DEFAULT_CONFIG = "configs/clip_vit_digits.yaml"
OPEN_CLIP_VENV = ".venv-open-clip"
MODEL_NAME = "dc-bench"
LAUNCHER = Path(__file__).with_name("open_clip_launch.py")
# The compute-bound size (the step, not the loader, sets the pace), over the config
SIZES = {
    "small": [],
    "compute": [
        "model.encoder=vit_tiny",
        "model.vit_width=192",
        "model.vit_depth=12",
        "model.vit_heads=3",
        "model.patch_size=8",
        "data.image_size=64",
        "text.width=256",
        "text.layers=4",
        "text.heads=4",
        "train.steps=50",
        "train.batch_size=64",
    ],
}
CHECKED_CAPTIONS = 64  # the first captions of the shards, tokenized by both


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dist-contrast bench vs_open_clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="a CLIP run config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--pairs", type=int, default=3, help="runs of each trainer, interleaved")
    p.add_argument("--steps", type=int, default=0, help="train.steps (0: the config's)")
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        help="steps left out of steady samples/s (0: a fifth of the steps)",
    )
    p.add_argument(
        "--vary-seed",
        action="store_true",
        help="pair p runs both trainers at seed run.seed + p - 1 (zero-shot over seeds)",
    )
    p.add_argument(
        "--only",
        choices=("ours", "open_clip"),
        help="run one trainer only (quality over seeds, a recipe change): no samples/s ratio",
    )
    p.add_argument("--load", type=int, default=0, help="busy processes beside each run")
    p.add_argument("--nproc", type=int, default=2, help="ranks of each run")
    p.add_argument("--data", default="data/digits/train-*.tar", help="training shards (glob)")
    p.add_argument(
        "--val-data",
        default="data/digits/val-*.tar",
        help="validation shards (glob) of the shared evaluator: zero-shot, kNN, linear probe",
    )
    p.add_argument("--no-eval", action="store_true", help="no zero-shot evaluation")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the config's)")
    p.add_argument("--open-clip-python", default=f"{OPEN_CLIP_VENV}/bin/python")
    p.add_argument("--dir", help="where runs go (default: a temporary folder, removed)")
    p.add_argument("--out", default=default_out("vs_open_clip.json"))
    args = p.parse_intermixed_args(argv)
    if "=" in args.config and not Path(args.config).exists():  # an override, no config given
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    if args.pairs < 1 or args.nproc < 1 or args.load < 0 or args.steps < 0 or args.skip < 0:
        p.error("--pairs and --nproc must be at least 1; --load, --steps, --skip at least 0")
    return args


# --------------------------------------------------------------------------------------------
# The translation (pure: no open_clip needed)


def bench_overrides(args: argparse.Namespace, shards: str, tokenizer: str) -> list[str]:
    """Our config's overrides: the size, the user's, then what makes the recipe open_clip's."""
    steps = [f"train.steps={args.steps}"] if args.steps else []
    return [
        *SIZES[args.size],
        *args.overrides,
        *steps,
        f"data.train_shards={shards}",
        "data.val_shards=",
        "data.tokenizer=bpe",
        f"data.tokenizer_path={tokenizer}",
        "data.channels=3",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]",
        "data.num_workers=1",
        "train.min_lr_ratio=0",
        "train.accumulation=1",
        "deepspeed.precision=fp32",
        "eval.every=0",
        "logging.wandb=false",
        "logging.progress=false",
        "logging.plots=false",
        "checkpoint.resume=",
    ]


def check_comparable(cfg) -> None:
    """Refuse, in one line, a config open_clip's CLIP cannot mirror."""
    from dist_contrast.errors import ConfigError

    m = cfg.model
    problems = []
    if cfg.method.name != "clip" or cfg.loss.name != "clip":
        problems.append("method.name and loss.name clip")
    if not m.encoder.startswith("vit") or m.vit_layout != "clip":
        problems.append("a ViT image tower with model.vit_layout=clip")
    if cfg.method.queues or m.lock_image:
        problems.append("no method.queues, no model.lock_image")
    if cfg.loss.gather != "all" or cfg.train.optimizer != "adamw":
        problems.append("loss.gather=all and train.optimizer=adamw")
    if problems:
        raise ConfigError(f"bench vs_open_clip needs {'; '.join(problems)} ({cfg.run.name})")


def open_clip_model_config(cfg, vocab_size: int, eot_id: int, pad_id: int, tok_dir: str) -> dict:
    """open_clip's model config (``CLIP(**config)``) of the towers ``cfg`` builds: the one
    ``export --format open_clip`` writes."""
    from dist_contrast.export.open_clip import model_config

    return model_config(cfg, vocab_size, eot_id, pad_id, tok_dir)


def _block_params(width: int, mlp_ratio: float) -> int:
    """One pre-norm block as open_clip builds it: ln_1, attention (in_proj, out_proj), ln_2,
    MLP (c_fc, c_proj), all with biases."""
    hidden = int(width * mlp_ratio)
    return (
        4 * width
        + 3 * width * (width + 1)
        + width * (width + 1)
        + 2 * width * hidden
        + hidden
        + width
    )


def open_clip_parameters(config: dict) -> int:
    """The parameter count open_clip's ``CLIP(**config)`` has (3-channel patch convolution
    without bias, class and position embeddings, ln_pre/ln_post, projections without bias,
    one logit scale); :func:`open_clip_model_config` is checked against it without open_clip."""
    v, t, e = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    w, p, grid = v["width"], v["patch_size"], v["image_size"] // v["patch_size"]
    vision = 3 * w * p * p + w + (grid * grid + 1) * w + 4 * w + w * e
    vision += v["layers"] * _block_params(w, v["mlp_ratio"])
    tw = t["width"]
    text = (t["vocab_size"] + t["context_length"]) * tw + 2 * tw + tw * e
    text += t["layers"] * _block_params(tw, t["mlp_ratio"])
    return vision + text + 1


def our_parameters(cfg) -> int:
    """Parameters of the method ``cfg`` builds (towers, projections, logit scale)."""
    from dist_contrast.methods import build_method

    return sum(p.numel() for p in build_method(cfg).parameters())


def first_captions(paths: list[str], n: int = CHECKED_CAPTIONS) -> list[str]:
    """The first ``n`` captions of the shards ``paths``."""
    from itertools import islice

    from dist_contrast.data.tokenizer import shard_captions

    return list(islice(shard_captions(paths), n))


def shard_pattern(paths: list[str]) -> str:
    """The shards as open_clip's ``--train-data`` takes them (``::``-separated)."""
    return "::".join(str(Path(p).resolve()) for p in paths)


def from_open_clip(state: dict) -> dict:
    """open_clip CLIP's state dict as our CLIP method's (models/open_clip.py's tables)."""
    from dist_contrast.models.open_clip import from_open_clip as mapped

    return mapped(state)


def open_clip_method(cfg, checkpoint: Path):
    """Our CLIP method of ``cfg`` with the weights of an open_clip_train checkpoint (read with
    ``weights_only``), checked key by key."""
    import torch

    from dist_contrast.export.layout import check_state
    from dist_contrast.methods import build_method

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    method = build_method(cfg)
    check_state(method, from_open_clip(state), f"open_clip checkpoint {checkpoint}")
    return method.eval()


# --------------------------------------------------------------------------------------------
# Reading the runs' logs (pure)


def steady(windows: list[tuple[int, float]], skip: int, global_batch: int) -> float | None:
    """Samples/s over the log windows that end after step ``skip``: ``windows`` are
    (last step of the window, seconds per step in it), in order."""
    steps = seconds = 0.0
    prev = 0
    for end, per_step in windows:
        n = end - prev
        if end > skip and n > 0:
            steps += n
            seconds += n * per_step
        prev = end
    return global_batch * steps / seconds if seconds else None


def our_windows(metrics: Path, global_batch: int) -> tuple[list[tuple[int, float]], float | None]:
    """(window end, s/step) of metrics.jsonl and the last row's loss."""
    windows, loss = [], None
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "samples_per_sec" not in row or not row.get("samples_per_sec"):
            continue
        windows.append((int(row["step"]), global_batch / row["samples_per_sec"]))
        loss = row.get("loss")
    return windows, loss


OC_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([0-9.]+),.*?Contrastive_loss: "
    r"([0-9.eE+-]+)"
)


def open_clip_windows(log: str, global_batch: int) -> tuple[list[tuple[int, float]], float | None]:
    """(window end, s/step) of open_clip_train's log lines and the last logged loss."""
    windows, loss = [], None
    for m in OC_LINE.finditer(log):
        windows.append((int(m.group(1)) // global_batch, float(m.group(2))))
        loss = float(m.group(3))
    return windows, loss


# --------------------------------------------------------------------------------------------
# Running


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Run:
    system: str
    pair: int
    wall_s: float = 0.0
    rc: int = 0
    peak_rss_mib: dict[int, float] = field(default_factory=dict)


def run_polled(cmd: list[str], env: dict, log: Path, run: Run) -> None:
    """Run ``cmd`` (torchrun) to its end, its output to ``log``; peak RSS of each rank (the
    launcher's children) into ``run``."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while proc.poll() is None:
                for pid in _children(proc.pid):
                    hwm = _hwm_mib(pid)
                    if hwm is not None:
                        run.peak_rss_mib[pid] = max(hwm, run.peak_rss_mib.get(pid, 0.0))
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    run.wall_s, run.rc = time.perf_counter() - start, proc.returncode


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    env.pop("WANDB_MODE", None)
    return env


def _torchrun(python: str, nproc: int) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def ours_cmd(args, config: str, overrides: list[str], run_dir: Path) -> list[str]:
    return [
        *_torchrun(sys.executable, args.nproc),
        "-m",
        "dist_contrast.cli",
        "train",
        "--config",
        config,
        *overrides,
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
    ]


def open_clip_cmd(
    args, cfg, model_json: Path, shards: str, logs: Path, name: str, seed: int
) -> list[str]:
    """torchrun of the launcher; open_clip_train's arguments go in a file beside the model
    config (on torchrun's command line, ``--logs`` is taken for its ``--logs-specs``)."""
    argv_json = model_json.parent / f"{name}-args.json"
    argv = open_clip_args(args, cfg, shards, logs, name, seed)
    argv_json.write_text(json.dumps(argv, indent=1))
    launcher = [str(LAUNCHER), str(model_json), str(argv_json)]
    return [*_torchrun(args.open_clip_python, args.nproc), *launcher]


def open_clip_args(args, cfg, shards: str, logs: Path, name: str, seed: int) -> list[str]:
    """open_clip_train.main's arguments for the recipe of ``cfg``."""
    t = cfg.train
    world_batch = t.batch_size * args.nproc
    return [
        "--model",
        MODEL_NAME,
        "--train-data",
        shards,
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(t.steps * world_batch),
        "--epochs",
        "1",
        "--batch-size",
        str(t.batch_size),
        "--workers",
        "1",
        "--lr",
        str(t.lr),
        "--wd",
        str(t.weight_decay),
        "--beta1",
        "0.9",
        "--beta2",
        "0.999",
        "--eps",
        "1e-8",
        "--warmup",
        str(t.warmup_steps),
        "--lr-scheduler",
        "cosine",
        "--grad-clip-norm",
        str(t.grad_clip),
        "--precision",
        "fp32",
        "--local-loss",
        "--gather-with-grad",
        "--image-mean",
        *map(str, cfg.data.mean),
        "--image-std",
        *map(str, cfg.data.std),
        "--aug-cfg",
        f"scale=({cfg.augment.crop_scale_min}, 1.0)",
        "--log-every-n-steps",
        str(t.log_every),
        "--seed",
        str(seed),
        "--report-to",
        "",
        "--logs",
        str(logs),
        "--name",
        name,
        "--dist-backend",
        "gloo",
        "--device",
        "cpu",
    ]


PROBE = r"""
import json, sys
import torch
import open_clip
open_clip.add_model_config(sys.argv[1])
torch.manual_seed(0)
model = open_clip.create_model(sys.argv[2]).eval()
tok = open_clip.get_tokenizer(sys.argv[2])
captions = json.loads(sys.argv[3])
tokens = tok(captions)
if len(sys.argv) > 4:  # weights and features for our side to compare
    size = model.visual.image_size
    images = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = {"image": model.encode_image(images), "text": model.encode_text(tokens[:4])}
    torch.save({"state_dict": model.state_dict(), "images": images, "tokens": tokens[:4],
                "features": feats}, sys.argv[4])
print(json.dumps({
    "parameters": sum(p.numel() for p in model.parameters()),
    "tokens": tokens.tolist(),
    "version": open_clip.__version__,
}))
"""


def probe(python: str, model_json: Path, captions: list[str], save: Path | None = None) -> dict:
    """Build the model config's model and tokenizer in the open_clip environment: its parameter
    count and the ids of ``captions``; with ``save``, its weights, random images, the first
    captions' ids and the features of both there (:func:`same_features`)."""
    extra = [str(save)] if save else []
    out = subprocess.run(
        [python, "-c", PROBE, str(model_json), MODEL_NAME, json.dumps(captions), *extra],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        from dist_contrast.errors import UserError

        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"open_clip in {python} failed ({last}): make open-clip-env")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_features(cfg, saved: Path) -> float:
    """The largest difference between open_clip's features and ours with its weights (loaded
    key by key), on the images and token ids :func:`probe` saved."""
    import torch

    ref = torch.load(saved, map_location="cpu", weights_only=True)
    method = open_clip_method(cfg, saved)
    with torch.no_grad():
        image = method.image(ref["images"])
        text = method.text(ref["tokens"])
    diffs = [(image - ref["features"]["image"]).abs(), (text - ref["features"]["text"]).abs()]
    return max(torch.nan_to_num(d, nan=math.inf).max().item() for d in diffs)  # NaN: inf


def evaluate(cfg, method) -> dict:
    """Our evaluator (``dist-contrast eval``'s figures of a method) on ``method``: zero-shot
    top-1 on the validation shards, kNN and linear-probe top-1, retrieval recalls."""
    from dist_contrast.eval.figures import method_figures, run_sets

    figures = method_figures(cfg, method, run_sets(cfg))
    return {k: v for k, v in figures.items() if isinstance(v, float)}


def our_method(cfg, run_dir: Path):
    """Our method at the last checkpoint of ``run_dir`` (verified against its manifest)."""
    from dist_contrast.export.write import trained_method
    from dist_contrast.train import integrity

    with integrity.reading(run_dir / "checkpoints", None) as step_dir:
        return trained_method(cfg, step_dir)


def last_open_clip_checkpoint(run_logs: Path) -> Path | None:
    found = sorted(run_logs.glob("checkpoints/epoch_*.pt"), key=lambda p: int(p.stem[6:]))
    return found[-1] if found else None


class Load:
    """``k`` busy processes while inside."""

    def __init__(self, k: int) -> None:
        self.k, self.procs = k, []

    def __enter__(self) -> Load:
        for _ in range(self.k):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def _figures(run: Run, windows, loss, skip: int, global_batch: int) -> dict:
    peaks = sorted(run.peak_rss_mib.values(), reverse=True)
    return {
        "system": run.system,
        "pair": run.pair,
        "rc": run.rc,
        "samples_per_s": steady(windows, skip, global_batch),
        "wall_s": run.wall_s,
        "peak_rss_mib": peaks,
        "final_loss": loss,
        "windows": windows,
    }


def _prepare(args, work: Path):
    """Our config, the shards, the tokenizer files and open_clip's model config; the checks."""
    from dist_contrast.config import load_config
    from dist_contrast.data.tokenizer import BPETokenizer
    from dist_contrast.errors import ConfigError, DataError
    from dist_contrast.export.hf import write_tokenizer

    paths = sorted(glob.glob(args.data))
    if not paths:
        raise DataError(f"no shards match --data {args.data!r} (make data writes data/digits)")
    base = load_config(args.config, args.overrides)
    tokenizer = args.tokenizer or base.data.tokenizer_path
    if not tokenizer or not Path(tokenizer).is_file():
        raise ConfigError(f"no tokenizer.json at {tokenizer!r}: give --tokenizer FILE")
    overrides = bench_overrides(args, args.data, tokenizer)
    cfg = load_config(args.config, overrides)
    check_comparable(cfg)
    tok = BPETokenizer.load(tokenizer, cfg.data.context_length)
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok, tok_dir)
    model_cfg = open_clip_model_config(cfg, tok.vocab_size, tok.eot_id, tok.pad_id, str(tok_dir))
    model_json = work / f"{MODEL_NAME}.json"
    model_json.write_text(json.dumps(model_cfg, indent=1) + "\n")
    ours = our_parameters(cfg)
    captions = first_captions(paths)
    theirs = probe(args.open_clip_python, model_json, captions, work / "reference.pt")
    ids = tok.encode(captions).tolist()
    diff = same_features(cfg, work / "reference.pt")
    checks = {
        "parameters_ours": ours,
        "parameters_open_clip": theirs["parameters"],
        "parameters_equal": ours == theirs["parameters"],
        "token_ids_equal": ids == theirs["tokens"],
        "features_max_abs_diff": diff,
        "open_clip_version": theirs["version"],
    }
    print(
        f"parameters: ours {ours:,}, open_clip {theirs['parameters']:,}"
        f" ({'equal' if checks['parameters_equal'] else 'DIFFERENT'}); token ids of "
        f"{len(captions)} captions {'equal' if checks['token_ids_equal'] else 'DIFFERENT'}; "
        f"open_clip's weights in our model: features within {diff:.1e} of open_clip's",
        flush=True,
    )
    return cfg, overrides, model_json, shard_pattern(paths), checks


def table(result: dict) -> str:
    rows = result["runs"]
    s = result["setup"]
    lines = [
        f"{s['size']} ({s['config']}): {s['steps']} steps x {s['nproc']} x {s['batch_size']}, "
        f"load {s['load']}, {s['cpu']}; parameters {s['checks']['parameters_ours']:,} / "
        f"{s['checks']['parameters_open_clip']:,}",
        "",
        "| system | pair | samples/s (steady) | wall s | peak RSS / rank (MiB) | final loss "
        "| zero-shot (our evaluator) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sps = "failed" if r["rc"] else (f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-")
        rss = " / ".join(f"{x:.0f}" for x in r["peak_rss_mib"]) or "-"
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        zs = r.get("eval", {}).get("zeroshot_top1")
        zs = "-" if zs is None else f"{100 * zs:.1f}%"
        lines.append(
            f"| {r['system']} | {r['pair']} | {sps} | {r['wall_s']:.0f} | {rss} | {loss} | {zs} |"
        )
    ratios = [f"{x:.2f}" for x in result["ratios"]]
    lines += ["", f"ours / open_clip samples/s by pair: {', '.join(ratios) or '-'}"]
    if result.get("pooled_ratio"):
        lines[-1] += f"; pooled (mean over pairs): {result['pooled_ratio']:.2f}"
    return "\n".join([*lines, "", *summary(result)])


def pair_ratios(runs: list[dict]) -> list[float]:
    """Ours over open_clip's steady samples/s, pair by pair, where both ran and were timed."""
    pairs: dict[int, dict[str, dict]] = {}
    for r in runs:
        pairs.setdefault(r["pair"], {})[r["system"]] = r
    ratios = []
    for both in pairs.values():
        ours, theirs = both.get("dist-contrast"), both.get("open_clip_train")
        if ours and theirs and ours["samples_per_s"] and theirs["samples_per_s"]:
            ratios.append(ours["samples_per_s"] / theirs["samples_per_s"])
    return ratios


def pooled_ratio(runs: list[dict]) -> float | None:
    """Mean steady samples/s of ours over open_clip's, over the runs that finished."""
    means = []
    for system in ("dist-contrast", "open_clip_train"):
        sps = [r["samples_per_s"] for r in runs if r["system"] == system and r["samples_per_s"]]
        means.append(sum(sps) / len(sps) if sps else None)
    return means[0] / means[1] if all(means) else None


def _mean(zero_shot: list[float | None]) -> str:
    """ " (mean X)" of two or more zero-shot top-1 values, as percent."""
    known = [z for z in zero_shot if z is not None]
    return f" (mean {100 * sum(known) / len(known):.2f})" if len(known) > 1 else ""


def _joined(values: list, fmt: str) -> str:
    return " / ".join("-" if v is None else fmt.format(v) for v in values) or "-"


def summary(result: dict) -> list[str]:
    """The comparison table: one row per system, its pairs' figures side by side."""
    s = result["setup"]
    size = f"{s['config']} ({s['size']}, {s['steps']} steps x {s['nproc']} x {s['batch_size']})"
    lines = [
        "| size | system | samples/s (steady), by pair | peak RSS / rank (MiB) | final loss "
        "| zero-shot (one shared evaluator) |",
        "|---|---|---|---|---|---|",
    ]
    for system in ("dist-contrast", "open_clip_train"):
        ran = [r for r in result["runs"] if r["system"] == system]
        if not ran:  # --only the other
            continue
        runs = [r for r in ran if not r["rc"]]
        peaks = [x for r in runs for x in r["peak_rss_mib"]]
        rss = f"{min(peaks):.0f}-{max(peaks):.0f}" if peaks else "-"
        zs = [r.get("eval", {}).get("zeroshot_top1") for r in runs]
        cells = [
            size if system == "dist-contrast" else "same",
            system,
            _joined([r["samples_per_s"] for r in runs], "{:.1f}"),
            rss,
            _joined([r["final_loss"] for r in runs], "{:.3f}"),
            _joined([None if z is None else 100 * z for z in zs], "{:.1f}%") + _mean(zs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if not Path(args.open_clip_python).exists():
        from dist_contrast.errors import UserError

        raise UserError(
            f"no open_clip environment at {args.open_clip_python}: make open-clip-env "
            "(or give --open-clip-python)"
        )
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vs_open_clip-", dir=args.dir))
    try:
        cfg, overrides, model_json, shards, checks = _prepare(args, work)
        t = cfg.train
        global_batch = t.batch_size * args.nproc
        skip = args.skip or t.steps // 5
        eval_cfg = None
        if not args.no_eval:
            from dist_contrast.config import load_config

            eval_cfg = load_config(args.config, [*overrides, f"data.val_shards={args.val_data}"])
        runs = []
        for pair in range(1, args.pairs + 1):
            seed = cfg.run.seed + (pair - 1 if args.vary_seed else 0)
            with Load(args.load):
                if args.only != "open_clip":
                    run = Run("dist-contrast", pair)
                    run_dir = work / f"ours-{pair}"
                    log = work / f"ours-{pair}.log"
                    ours = ours_cmd(args, args.config, [*overrides, f"run.seed={seed}"], run_dir)
                    run_polled(ours, _env(), log, run)
                    metrics = run_dir / "metrics.jsonl"
                    windows, loss = (
                        our_windows(metrics, global_batch) if metrics.exists() else ([], None)
                    )
                    runs.append({**_figures(run, windows, loss, skip, global_batch), "seed": seed})
                    if eval_cfg is not None and run.rc == 0:
                        runs[-1]["eval"] = evaluate(eval_cfg, our_method(eval_cfg, run_dir))
                    _report(runs[-1], log)
                if args.only != "ours":
                    run = Run("open_clip_train", pair)
                    log = work / f"open_clip-{pair}.log"
                    logs = work / "open_clip"
                    cmd = open_clip_cmd(args, cfg, model_json, shards, logs, f"run-{pair}", seed)
                    run_polled(cmd, _env(), log, run)
                    text = log.read_text(errors="replace")
                    windows, loss = open_clip_windows(text, global_batch)
                    runs.append({**_figures(run, windows, loss, skip, global_batch), "seed": seed})
                    checkpoint = last_open_clip_checkpoint(work / "open_clip" / f"run-{pair}")
                    if eval_cfg is not None and run.rc == 0 and checkpoint:
                        method = open_clip_method(eval_cfg, checkpoint)
                        runs[-1]["eval"] = evaluate(eval_cfg, method)
                    _report(runs[-1], log)
        ratios = pair_ratios(runs)
        result = {
            "setup": {
                "config": args.config,
                "size": args.size,
                "overrides": overrides,
                "steps": t.steps,
                "skip": skip,
                "batch_size": t.batch_size,
                "nproc": args.nproc,
                "load": args.load,
                "vary_seed": args.vary_seed,
                "only": args.only,
                "cpu": cpu_model(),
                "cores": usable_cores(),
                "checks": checks,
                "open_clip_model_config": json.loads(model_json.read_text()),
            },
            "runs": runs,
            "ratios": ratios,
            "pooled_ratio": pooled_ratio(runs),
        }
        print(table(result))
        print(f"written to {write_json(args.out, result)}")
        return 0 if all(r["rc"] == 0 for r in runs) else 1
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _report(fig: dict, log: Path) -> None:
    if fig["rc"]:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"{fig['system']} pair {fig['pair']} failed (exit {fig['rc']}):", *tail, sep="\n")
    else:
        sps = fig["samples_per_s"]
        zs = fig.get("eval", {}).get("zeroshot_top1")
        print(
            f"{fig['system']} pair {fig['pair']}: {sps and round(sps, 1)} samples/s, "
            f"{fig['wall_s']:.0f} s, loss {fig['final_loss']}"
            + ("" if zs is None else f", zero-shot {100 * zs:.1f}%"),
            flush=True,
        )
